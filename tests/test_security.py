"""The security review's findings (issue 20), each as an attack or a user's path that must fail safely.

The hostile files are built here by the tests, never committed."""

import io
import json
import os
import pickle
import signal
import tarfile
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_convert import TOKENIZER, VOCAB, dit_weights, write_ckpt, write_mdlm
from test_hub import copy_reference

from modeling_mdm_prime.tools import (
    check_checkpoint,
    pickle_reason,
    public_settings,
    render_model_card,
    stage_checkpoint,
)
from modeling_mdm_prime.tools.convert import (
    check_structure,
    convert_checkpoint,
    load_lightning_checkpoint,
    restricted_torch_load,
)


@contextmanager
def deadline(seconds: int):
    """Turn a hang (the FIFO attacks) into a test failure."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s: the call hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def exploit(marker: Path) -> str:
    """A Jinja2 payload that runs a shell command if it is ever rendered as template source."""
    return "{% endraw %}{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}{% raw %}"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A converted ℓ = 2 checkpoint (a .ckpt deep inside a local folder)."""
    tmp = tmp_path_factory.mktemp("converted")
    weights = dit_weights(2, seed=11, mask_row=False)
    source = tmp / "private" / "runs" / "source.ckpt"
    source.parent.mkdir(parents=True)
    write_ckpt(source, 2, True, weights, weights)
    return convert_checkpoint(source, tmp / "out", tokenizer=TOKENIZER)


# -- 1. code execution through the model card -------------------------------------------------------------------------


def test_hostile_state_dict_key_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    weights = dit_weights(2, seed=12, mask_row=False)
    path = write_ckpt(tmp_path / "hostile.ckpt", 2, True, weights, weights)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["state_dict"][exploit(marker)] = torch.zeros(1)
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"state-dict key .*endraw.* is not a parameter name"):
        convert_checkpoint(path, tmp_path / "out", tokenizer=TOKENIZER)
    assert not marker.exists()


def test_conversion_record_reaches_the_card_only_as_escaped_data(converted, tmp_path):
    """Even a hand-edited conversion.json (data from someone else's folder) cannot run code or add markup: it is
    a template variable, escaped, in a sandbox; the published card shows it literally."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "edited"
    folder.mkdir()
    for path in converted.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    record = json.loads((folder / "conversion.json").read_text())
    record["source"]["ignored_keys"] = [exploit(marker), "<script>alert(1)</script>"]
    record["source"]["name"] = exploit(marker) + "<img src=x onerror=alert(1)>"
    (folder / "conversion.json").write_text(json.dumps(record))
    card = str(render_model_card(folder, "user/model"))
    staged = stage_checkpoint(folder, tmp_path / "staged", "user/model")
    assert not marker.exists()
    assert "## Conversion" in card and "cycler" in card
    assert "<img" not in card and "&lt;img src=x onerror=alert\\(1\\)&gt;" in card  # text: HTML escaped
    assert "`<script>alert(1)</script>`" in card  # a key: shown as a code span, where HTML is literal
    assert (staged / "README.md").read_text() == card


@pytest.mark.parametrize(
    "payload",
    ["{{ cycler.__init__.__globals__ }}", "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}"],
)
def test_card_template_cannot_reach_python(converted, tmp_path, payload):
    marker = tmp_path / "pwned"
    template = tmp_path / "card.md"
    template.write_text("---\n{{ card_data }}\n---\n# {{ model_name }}\n" + payload.replace("{marker}", str(marker)))
    with pytest.raises(ValueError, match=r"card.md was refused: .*unsafe"):
        render_model_card(converted, "user/model", template=template)
    with pytest.raises(ValueError, match="was refused"):
        stage_checkpoint(converted, tmp_path / "staged", "user/model", template=template)
    assert not marker.exists()
    # Formatting, loops and filters still work in a user's template.
    template.write_text('---\n{{ card_data }}\n---\n{{ "{:,}".format(num_parameters) }} {{ "%.1f"|format(ell) }}\n')
    assert "2.0" in str(render_model_card(converted, "user/model", template=template))


# -- 2. and 3. hostile checkpoints ------------------------------------------------------------------------------------


def test_memo_shared_nesting_is_refused_before_it_is_walked(tmp_path):
    node: list = []
    for _ in range(40):  # 4^40 paths through 40 small lists
        node = [node, node, node, node]
    path = tmp_path / "bomb.ckpt"
    torch.save({"state_dict": node}, path)
    assert path.stat().st_size < 4096
    with pytest.raises(ValueError, match=r"more than max_items = 100,000 items"):
        restricted_torch_load(path, max_items=100_000)  # the default, 10^7, is refused the same way in ~15 s


def test_reference_cycles_end_in_a_clear_error_and_deep_nesting_is_refused(tmp_path):
    """A cycle in the config the converter reads was a RecursionError; now a ValueError naming it. (Cycles elsewhere
    load: OmegaConf's own nodes point back at their parents.)"""
    weights = dit_weights(2, seed=12, mask_row=False)
    path = write_ckpt(tmp_path / "cycle.ckpt", 2, True, weights, weights)
    checkpoint = torch.load(path, weights_only=False)
    loop: dict = {"model": {}}
    loop["model"]["inner"] = loop
    checkpoint["hyper_parameters"] = {"config": loop}
    torch.save(checkpoint, path)
    restricted_torch_load(path)
    with pytest.raises(ValueError, match="config holds a reference cycle"):
        load_lightning_checkpoint(path)
    deep: list = []
    for _ in range(100):
        deep = [deep]
    torch.save(deep, tmp_path / "deep.ckpt")
    with pytest.raises(ValueError, match="deeper than max_depth = 64"):
        restricted_torch_load(tmp_path / "deep.ckpt")
    # Shared references and cycles are walked in bounded time.
    shared = torch.ones(3)
    check_structure({"a": [shared, shared], "b": (shared,), "c": loop})


def test_stride_zero_tensor_claiming_more_than_its_storage_is_refused(tmp_path):
    huge = torch.zeros(1).expand(2**17, 2**15)  # 2^32 float32 elements (16 GiB) on a 4-byte storage
    path = tmp_path / "expand.ckpt"
    torch.save({"state_dict": {"w": huge}}, path)
    assert path.stat().st_size < 4096
    with pytest.raises(ValueError, match=r"claims 4,294,967,296 elements .* storage holds 1"):
        restricted_torch_load(path)
    overlapping = torch.arange(4.0).as_strided((3, 2), (1, 1))  # 6 elements over a 4-element storage
    torch.save(overlapping, tmp_path / "overlap.ckpt")
    with pytest.raises(ValueError, match="overlapping view"):
        restricted_torch_load(tmp_path / "overlap.ckpt")
    # An ordinary view of a larger storage (a slice) loads.
    torch.save(torch.arange(10.0)[2:5], tmp_path / "slice.ckpt")
    assert restricted_torch_load(tmp_path / "slice.ckpt").tolist() == [2.0, 3.0, 4.0]


def test_compressed_and_oversized_zip_records_are_refused(tmp_path):
    plain = tmp_path / "plain.ckpt"
    torch.save({"w": torch.zeros(1000)}, plain)
    deflated = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(ValueError, match="compressed zip record"):
        restricted_torch_load(deflated)
    with pytest.raises(ValueError, match="max_bytes = 100"):
        restricted_torch_load(plain, max_bytes=100)
    assert restricted_torch_load(plain)["w"].shape == (1000,)


def test_every_non_zip_input_is_refused_without_hanging(tmp_path):
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tar:
        member = tarfile.TarInfo("storages")
        member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(member)
    fifo = tmp_path / "fifo.ckpt"
    os.mkfifo(fifo)
    (tmp_path / "link.ckpt").symlink_to(fifo)
    with deadline(20):
        for path in (legacy, archive):
            with pytest.raises(ValueError, match="not a torch zip checkpoint.*legacy tar format"):
                restricted_torch_load(path)
            with pytest.raises(ValueError, match="not a torch zip checkpoint"):
                restricted_torch_load(path, allow_unsafe_pickle=True)  # the opt-in lifts the pickle rules only
        for path in (fifo, tmp_path / "link.ckpt"):
            with pytest.raises(ValueError, match="not a regular file"):
                load_lightning_checkpoint(path)


# -- 4. converter inputs that would convert into a broken model ------------------------------------------------------


def test_nan_weights_mixed_dtypes_and_a_mask_row_at_ell_2_are_refused(tmp_path):
    weights = dit_weights(1, seed=13, mask_row=True)
    weights["blocks.1.mlp.0.weight"] = weights["blocks.1.mlp.0.weight"].clone()
    weights["blocks.1.mlp.0.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"blocks.1.mlp.0.weight .* holds 1 NaN or infinite"):
        convert_checkpoint(write_mdlm(tmp_path / "nan", weights), tmp_path / "out1", tokenizer=TOKENIZER)
    weights = dit_weights(1, seed=13, mask_row=True)
    weights["blocks.0.attn_out.weight"] = weights["blocks.0.attn_out.weight"].double()
    with pytest.raises(ValueError, match=r"mixed dtypes: most weights are torch.float32, but blocks.0.attn_out"):
        convert_checkpoint(write_mdlm(tmp_path / "mixed", weights), tmp_path / "out2", tokenizer=TOKENIZER)
    weights = dit_weights(2, seed=13, mask_row=True)
    path = write_ckpt(tmp_path / "mask_row.ckpt", 2, True, weights, weights)
    with pytest.raises(ValueError, match=f"has {VOCAB + 1} rows at ℓ = 2; expected exactly the vocabulary"):
        load_lightning_checkpoint(path)


def test_card_and_record_do_not_show_the_local_source_path(converted):
    private = str(converted.parent / "private")
    for name in ("README.md", "conversion.json"):
        text = (converted / name).read_text()
        assert "source.ckpt" in text and private not in text, name


# -- 5. to 7. publishing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["samples.txt", "merges.txt", "notes.txt"])
def test_symlinks_leaving_the_folder_are_refused_by_name(tmp_path, name):
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    checkpoint = copy_reference(tmp_path)
    (checkpoint / name).unlink(missing_ok=True)
    (checkpoint / name).symlink_to(secret)
    extra = [name] if name == "notes.txt" else []
    with pytest.raises(ValueError, match=rf"{name} -> .*id_rsa resolve\(s\) outside the folder"):
        check_checkpoint(checkpoint, extra)
    with pytest.raises(ValueError, match="outside the folder"):
        stage_checkpoint(checkpoint, tmp_path / "staged", "user/model", extra_files=extra)
    assert not (tmp_path / "staged").exists() or not any((tmp_path / "staged").iterdir())


def test_training_settings_are_always_published_sanitised(tmp_path):
    checkpoint = copy_reference(tmp_path)
    settings = json.loads((checkpoint / "training_config.json").read_text())
    settings.update(
        output_dir="/home/alice/runs/secret-project",
        hub_token="hf_" + "a" * 34,
        wandbApiKey="0123456789abcdef",
        logging={"db-password": "hunter2", "endpoint": "/home/alice/.config/x.yaml"},
        note="hf_" + "b" * 34,
        dataset="/home/alice/data/plays.jsonl.xz",
    )
    (checkpoint / "training_config.json").write_text(json.dumps(settings))
    staged = stage_checkpoint(checkpoint, tmp_path / "staged", "user/model")
    published = json.loads((staged / "training_config.json").read_text())
    assert published == public_settings(settings)
    everything = "".join(p.read_text(errors="replace") for p in staged.iterdir())
    for secret in ("/home/alice", "hf_aaaa", "hf_bbbb", "0123456789abcdef", "hunter2", "secret-project"):
        assert secret not in everything, secret
    assert published["dataset"] == "plays.jsonl.xz" and published["tokenizer"] == settings["tokenizer"]
    assert published["logging"] == {"endpoint": "x.yaml"} and "sample_tokens" in published


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (pickle.dumps({"a": [1, 2]}, protocol=0), "pickle stream (protocol 0 or 1)"),
        (pickle.dumps({"a": [1, 2]}, protocol=1), "pickle stream (protocol 0 or 1)"),
        (b"cos\nsystem\n(S'touch pwned'\ntR.", "pickle stream (protocol 0 or 1)"),
        (zlib.compress(pickle.dumps([1, 2], protocol=0)), "zlib-compressed"),
        (zlib.compress(pickle.dumps([1, 2], protocol=4)), "zlib-compressed"),
    ],
)
def test_pickles_of_every_protocol_and_zlib_are_found(tmp_path, content, reason):
    (tmp_path / "notes.txt").write_bytes(content)
    found = pickle_reason(tmp_path / "notes.txt")
    assert found is not None and reason in found


def test_text_files_are_not_mistaken_for_protocol_0_pickles(tmp_path):
    texts = ["The quick brown fox.\n", "(a) first\n(b) second\n", "N", "#version: 0.2\nĠ t\n", "cos\nsin\n"]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text)
        assert pickle_reason(tmp_path / f"{i}.txt") is None, text


def test_safetensors_with_trailing_or_inconsistent_bytes_are_refused(tmp_path):
    checkpoint = copy_reference(tmp_path)
    weights = checkpoint / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original + pickle.dumps({"x": 1}, protocol=4))
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        check_checkpoint(checkpoint)
    weights.write_bytes(original[:-4])  # truncated: the header's end is past the file's
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        check_checkpoint(checkpoint)
    buffer = io.BytesIO()
    save_file({"w": torch.zeros(3)}, str(tmp_path / "ok.safetensors"))
    header = (tmp_path / "ok.safetensors").read_bytes()
    forged = header.replace(b'"shape":[3]', b'"shape":[9]')  # claims more data than it has
    buffer.write(forged)
    weights.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        check_checkpoint(checkpoint)
    weights.write_bytes(original)
    check_checkpoint(checkpoint)


def test_links_the_push_does_not_read_do_not_block_it(tmp_path):
    """Only what is published or read into the card must resolve inside the folder: a symlinked run folder beside
    the model (left out anyway) does not stop a push, and nothing of it is staged."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.txt").write_text("do not publish")
    checkpoint = copy_reference(tmp_path)
    (checkpoint / "runs").symlink_to(outside, target_is_directory=True)
    staged = stage_checkpoint(checkpoint, tmp_path / "staged", "user/model")
    assert not (staged / "runs").exists()
    assert "do not publish" not in "".join(p.read_text(errors="replace") for p in staged.iterdir() if p.is_file())
