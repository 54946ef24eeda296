"""Publishing to a Hub and loading back: the real huggingface_hub client against a local Hub server
(tests/hub_server.py), in fresh processes, on transformers 5.x and 4.57; and the committed reference checkpoint.

The client processes get ``HF_ENDPOINT`` before huggingface_hub is imported, ``HF_HUB_DISABLE_XET=1``, no
``HF_HUB_OFFLINE``, and their own ``HF_HOME`` so that no token saved on the machine is used.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_server import DOWN, LocalHub
from test_remote_code import SHIPPED
from transformers import AutoTokenizer

import modeling_mdm_prime
from fresh_interpreter import tf4_python
from modeling_mdm_prime import MDMPrimeForMaskedDiffusion
from modeling_mdm_prime.tools import (
    HubPublishError,
    check_checkpoint,
    checkpoint_contents,
    count_parameters,
    is_image_checkpoint,
    load_eval_results,
    pickle_reason,
    publish_checkpoint,
    render_model_card,
    select_files,
    shipped_code_differences,
    shipped_code_files,
    stage_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "checkpoints" / "mdm-prime-shakespeare-tiny"
REFERENCE_CARD = REPO / "model_cards" / "mdm-prime-shakespeare-tiny.md"
# The options the reference card was rendered with (docs/guides/reference-checkpoints.md has the command).
REFERENCE_CARD_OPTIONS = dict(
    language=["en"],
    license="apache-2.0",
    example_prompt="ROMEO:",
    training_data="the 42 Shakespeare plays bundled in examples/data (public domain)",
)
TOKEN, USER = "hf_local_test_token", "user"
REPO_ID, BRANCH = f"{USER}/mdm-prime-tiny", "v1"
PROMPT, NEW_TOKENS = "ROMEO:", 12
REFRESH_CODE = (
    '.venv/bin/python -c "import shutil; from modeling_mdm_prime import shipped_code_files as f; '
    "d = 'checkpoints/mdm-prime-shakespeare-tiny'; [shutil.copy('modeling_mdm_prime/' + n, d) for n in f(d)]\""
)

PUBLISH = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from modeling_mdm_prime.tools import publish_checkpoint

old_checkpoint, checkpoint, repo_id, branch = sys.argv[2:6]
card = dict(datasets=["user/shakespeare-plays"], language=["en"], license="apache-2.0")
runs = {}
runs["first"] = publish_checkpoint(
    old_checkpoint, repo_id, private=True, revision=branch, commit_message="First release", example_prompt="ROMEO:",
    extra_files=["old_helper.py"], **card
)
# Publishing again, another card and without the old checkpoint's extra code file: a commit with only the changes.
runs["update"] = publish_checkpoint(
    checkpoint, repo_id, private=True, revision=branch, commit_message="Card: another prompt",
    example_prompt="JULIET:", **card
)
# Nothing changed: no commit.
runs["same"] = publish_checkpoint(checkpoint, repo_id, revision=branch, example_prompt="JULIET:", **card)
# A pull request against the branch.
runs["pr"] = publish_checkpoint(
    checkpoint, repo_id, revision=branch, create_pr=True, commit_message="Proposal", example_prompt="KING:", **card
)
print(json.dumps({name: {"oid": info.oid, "url": str(info), "pr_url": info.pr_url} for name, info in runs.items()}))
"""

ERRORS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from modeling_mdm_prime.tools import publish_checkpoint

checkpoint, token, dead_endpoint = sys.argv[2:5]
results = []
def attempt(name, repo_id, **kwargs):
    try:
        info = publish_checkpoint(checkpoint, repo_id, **kwargs)
        results.append({"name": name, "ok": True, "oid": info.oid})
    except Exception as error:
        results.append({"name": name, "ok": False, "type": type(error).__name__, "message": str(error)})

attempt("no_token", "user/flaky")  # no HF_TOKEN and an empty HF_HOME
attempt("bad_token", "user/flaky", token="hf_not_a_valid_token")
attempt("server_down", "user/flaky", token=token, endpoint=dead_endpoint)
# --new_repo (exist_ok=False) semantics: the first attempt creates the repository, the retries complete it.
attempt("dropped", "flaky", token=token, exist_ok=False)  # the server closes the connection during the commit
attempt("server_error", "flaky", token=token, exist_ok=False)  # the server answers 500 to the commit
attempt("retry", "flaky", token=token, exist_ok=False)  # the same call again completes the repository
attempt("exists", "user/flaky", token=token, exist_ok=False)  # now it has files
attempt("public_but_private_asked", "user/flaky", token=token, private=True)
print(json.dumps(results))
"""

CLIENT_API = r"""
import json, os, sys
from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download

folder, cache = sys.argv[1:3]
api = HfApi()
api.create_repo("user/api-check")
api.upload_folder(repo_id="user/api-check", folder_path=folder, commit_message="upload", allow_patterns=["*.json"])
api.create_commit("user/api-check", [CommitOperationAdd("sub/dir/notes.txt", b"hello")], commit_message="nested")
report = {
    "refs": [ref.name for ref in api.list_repo_refs("user/api-check").branches],
    "tree": sorted(entry.path for entry in api.list_repo_tree("user/api-check")),
    "tree_sub": sorted(entry.path for entry in api.list_repo_tree("user/api-check", "sub", recursive=True)),
    "paths_info": sorted(entry.path for entry in api.get_paths_info("user/api-check", ["config.json", "sub", "nope"])),
    "commits": [commit.title for commit in api.list_repo_commits("user/api-check")],
    "exists": [api.file_exists("user/api-check", "config.json"), api.file_exists("user/api-check", "nope.json")],
    "snapshot": sorted(os.listdir(snapshot_download("user/api-check", cache_dir=cache))),
}
api.delete_file("sub/dir/notes.txt", "user/api-check")
report["after_delete"] = sorted(api.list_repo_files("user/api-check"))
api.delete_repo("user/api-check")
report["repo_exists"] = api.repo_exists("user/api-check")
print(json.dumps(report))
"""

LOADER = r"""
import json, re, sys
sys.modules["modeling_mdm_prime"] = None  # only the code in the repository may be used
try:
    import modeling_mdm_prime  # noqa: F401
    raise SystemExit("modeling_mdm_prime is importable in the loader process")
except ImportError:
    pass
import transformers
from transformers import AutoModel, AutoTokenizer

model_id, revision, prompt, new_tokens, card = sys.argv[1:6]
revision, new_tokens = revision or None, int(new_tokens)
model = AutoModel.from_pretrained(model_id, trust_remote_code=True, revision=revision).eval()
tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True, revision=revision)
batch = tokenizer([prompt], return_tensors="pt")
generated = model.generate(**batch, max_new_tokens=new_tokens, num_steps=new_tokens, seed=0)
report = {
    "transformers": transformers.__version__,
    "class": [type(model).__name__, type(model).__module__],
    "tokenizer": type(tokenizer).__name__,
    "generated": generated.tolist(),
}
if card:  # run the model card's usage snippet as it is written
    if card == "hub":
        from huggingface_hub import hf_hub_download
        card = hf_hub_download(model_id, "README.md", revision=revision)
    snippet = re.search(r"```python\n(.*?)```", open(card, encoding="utf-8").read(), re.S).group(1)
    exec(compile(snippet, "model-card-snippet", "exec"), {})
    report["snippet"] = "ran"
print(json.dumps(report))
"""


# -- helpers --------------------------------------------------------------------------------------------------------


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a fresh client process: its own caches and HF_HOME, no Hub settings from this one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(
        HF_HOME=str(tmp / "hf-home"),
        HF_HUB_CACHE=str(tmp / "hub-cache"),
        HF_MODULES_CACHE=str(tmp / "modules"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_XET="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def hub_env(hub: LocalHub, tmp: Path, **extra: str) -> dict[str, str]:
    return clean_env(tmp, HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, **extra)


def run_json(args: list[str], env: dict[str, str], cwd: Path):
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def tree_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


# Files that sit in checkpoint folders and are not part of a model: a push must leave them out.
UNRELATED = {
    "credentials.json": b'{"token": "hf_secret"}\n',
    "notes.txt": b"private notes\n",
    "helper.py": b"print('not imported by the model code')\n",
    "model.safetensors.bak": None,  # a copy of the weights
    "checkpoint-500/optimizer.safetensors": b"not a model file\n",
}


def add_unrelated_files(folder: Path) -> None:
    for name, content in UNRELATED.items():
        path = folder / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content if content is not None else (folder / "model.safetensors").read_bytes())


def copy_reference(tmp_path: Path, name: str = "checkpoint") -> Path:
    checkpoint = tmp_path / name
    shutil.copytree(REFERENCE, checkpoint)
    return checkpoint


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def interpreters():
    yield pytest.param(sys.executable, id="transformers-5")
    python = tf4_python()
    marks = [] if python else [pytest.mark.skip("no transformers 4.57 env (.ci/run builds one)")]
    yield pytest.param(python, id="transformers-4.57", marks=marks)


@pytest.fixture(scope="module")
def reference_outputs():
    """The reference checkpoint's seeded sample, generated with the installed package in this process."""
    model = MDMPrimeForMaskedDiffusion.from_pretrained(REFERENCE).eval()
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE)
    batch = tokenizer([PROMPT], return_tensors="pt")
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=NEW_TOKENS, num_steps=NEW_TOKENS, seed=0).tolist()


@pytest.fixture(scope="module")
def hub():
    with LocalHub(tokens={TOKEN: USER}) as server:
        yield server


@pytest.fixture(scope="module")
def published(hub, tmp_path_factory):
    """The reference checkpoint (copies) published four times by a fresh client process: see PUBLISH. The first
    push is of an older checkpoint with one more code file."""
    tmp = tmp_path_factory.mktemp("publish")
    checkpoint, old = tmp / "checkpoint", tmp / "checkpoint-old"
    shutil.copytree(REFERENCE, checkpoint)
    shutil.copytree(REFERENCE, old)
    (old / "old_helper.py").write_text("# a code file that the next version of the checkpoint no longer has\n")
    for folder in (checkpoint, old):
        add_unrelated_files(folder)
    before = {"new": tree_hashes(checkpoint), "old": tree_hashes(old)}
    hub.clear_requests()
    runs = run_json(
        [sys.executable, "-c", PUBLISH, str(REPO), str(old), str(checkpoint), REPO_ID, BRANCH],
        hub_env(hub, tmp),
        cwd=tmp,
    )
    assert {"new": tree_hashes(checkpoint), "old": tree_hashes(old)} == before, "publishing modified a checkpoint"
    return runs, list(hub.requests), checkpoint


@pytest.fixture(scope="module")
def failures(hub, tmp_path_factory):
    """Error paths, run in one fresh client process: see ERRORS."""
    tmp = tmp_path_factory.mktemp("errors")
    checkpoint = tmp / "checkpoint"
    shutil.copytree(REFERENCE, checkpoint)
    before = tree_hashes(checkpoint)
    hub.clear_requests()
    hub.fail("POST", rf"^/api/models/{USER}/flaky/commit/", status=None)  # "dropped"
    hub.fail("POST", rf"^/api/models/{USER}/flaky/commit/", status=500)  # "server_error"
    env = clean_env(tmp, HF_ENDPOINT=hub.url)  # no HF_TOKEN: the token is passed explicitly where one is wanted
    dead = f"http://127.0.0.1:{free_port()}"
    results = run_json([sys.executable, "-c", ERRORS, str(REPO), str(checkpoint), TOKEN, dead], env, cwd=tmp)
    assert tree_hashes(checkpoint) == before, "a failed or repeated push modified the checkpoint folder"
    return {r["name"]: r for r in results}, list(hub.requests), checkpoint


# -- publishing -----------------------------------------------------------------------------------------------------


def test_publish_creates_a_private_repo_on_a_branch_with_everything(hub, published):
    runs, requests, checkpoint = published
    repo = hub.repos[REPO_ID]
    assert repo.private and set(repo.refs) == {"main", BRANCH, "refs/pr/1"}
    assert set(hub.files(REPO_ID, "main")) == {".gitattributes"}  # the branch was made from main, main untouched
    files = hub.files(REPO_ID, BRANCH)
    expected = set(checkpoint_contents(checkpoint, REPO_ID, revision=BRANCH)) | {".gitattributes"}
    assert set(files) == expected
    required = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert {*required, "README.md", "eval_results.json", "training_config.json", *SHIPPED} <= set(files)
    assert not set(files) & {"credentials.json", "notes.txt", "helper.py", "model.safetensors.bak"}
    assert not any(path.startswith("checkpoint-500") for path in files)
    for name in (*SHIPPED, "model.safetensors", "config.json", "tokenizer.json", "generation_config.json"):
        assert files[name] == (checkpoint / name).read_bytes(), name
    head = repo.resolve(BRANCH)
    assert head.files["model.safetensors"].lfs and not head.files["config.json"].lfs
    assert json.loads(files["config.json"])["auto_map"]["AutoModel"] == "modeling_mdm_prime.MDMPrimeForMaskedDiffusion"
    assert json.loads(files["tokenizer_config.json"])["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_publishing_again_updates_the_repo(hub, published):
    runs, requests, _ = published
    repo = hub.repos[REPO_ID]
    history = repo.history(repo.resolve(BRANCH))
    assert [c.title for c in history] == ["Card: another prompt", "First release", "initial commit"]
    assert [c.oid for c in history[:2]] == [runs["update"]["oid"], runs["first"]["oid"]]
    assert runs["same"]["oid"] == runs["update"]["oid"]  # nothing changed: no new commit
    first, update = repo.commits[runs["first"]["oid"]].files, repo.commits[runs["update"]["oid"]].files
    assert {path for path in update if update[path] != first.get(path)} == {"README.md"}
    assert set(first) - set(update) == {"old_helper.py"}  # a stale code file of the earlier push is deleted
    assert "JULIET:" in update["README.md"].data.decode() and "JULIET:" not in first["README.md"].data.decode()
    # The weights went up once: later pushes found them unchanged (preupload) and did not send them again.
    assert [path for method, path, *_ in requests if method == "PUT"] == [
        f"/{REPO_ID}/lfs-upload/{first['model.safetensors'].sha256}"
    ]
    assert sum(1 for method, path, *_ in requests if method == "POST" and "/commit/" in path) == 3


def test_pull_request_against_the_branch(hub, published):
    runs, _, _ = published
    assert runs["pr"]["pr_url"] == f"{hub.url}/{REPO_ID}/discussions/1"
    assert "KING:" in hub.files(REPO_ID, "refs/pr/1")["README.md"].decode()
    assert "KING:" not in hub.files(REPO_ID, BRANCH)["README.md"].decode()


def test_private_repo_needs_the_token(hub, published):
    url = f"{hub.url}/{REPO_ID}/resolve/{BRANCH}/config.json"
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(url, timeout=10)
    assert error.value.code == 401 and error.value.headers["X-Error-Code"] == "RepoNotFound"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert json.loads(answer.read())["model_type"] == "mdm_prime"


def test_card_metadata(hub, published):
    from huggingface_hub import ModelCard

    _, _, checkpoint = published
    text = hub.files(REPO_ID, BRANCH)["README.md"].decode()
    card = ModelCard(text)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert {"masked-diffusion", "discrete-diffusion", "mdm-prime", "custom_code"} <= set(data["tags"])
    assert data["datasets"] == ["user/shakespeare-plays"] and data["language"] == ["en"]
    assert data["license"] == "apache-2.0" and data["inference"] is False
    # No pipeline tag: text-generation would advertise left-to-right decoding.
    assert "pipeline_tag" not in data and "text-generation" not in text.split("\n---\n", 1)[0]
    evaluation = load_eval_results(checkpoint)["results"][0]
    (entry,) = data["model-index"]
    metrics = {m["type"]: m for m in entry["results"][0]["metrics"]}
    assert metrics["perplexity"]["value"] == pytest.approx(evaluation["ppl_bound"], abs=1e-4)
    assert metrics["perplexity"]["name"] == "valid-bound perplexity (NELBO)"
    assert metrics["nelbo"]["value"] == pytest.approx(evaluation["nelbo_per_token"], abs=1e-4)
    assert "paper" not in json.dumps(entry).lower()  # the paper objective is not a bound: not in the metadata
    body = card.text
    assert "not a likelihood bound" in body and f"{evaluation['ppl_bound']:.2f}" in body
    assert f'revision="{BRANCH}"' in body and "trust_remote_code=True" in body and "## Limitations" in body


@pytest.mark.slow
@pytest.mark.parametrize("python", list(interpreters()))
def test_load_from_the_hub_in_a_fresh_process(hub, published, reference_outputs, python, tmp_path):
    """AutoModel/AutoTokenizer from the local Hub with trust_remote_code and a revision, the package not
    importable; the seeded sample equals the package's, and the card's snippet runs as written."""
    report = run_json(
        [python, "-I", "-c", LOADER, REPO_ID, BRANCH, PROMPT, str(NEW_TOKENS), "hub"], hub_env(hub, tmp_path), tmp_path
    )
    assert report["class"][0] == "MDMPrimeForMaskedDiffusion" and report["class"][1].startswith("transformers_modules")
    assert report["generated"] == reference_outputs
    assert report["snippet"] == "ran"


def test_local_hub_speaks_the_client_api(hub, tmp_path):
    """The test server answers the rest of the client's repository API as the Hub does."""
    args = [sys.executable, "-c", CLIENT_API, str(REFERENCE), str(tmp_path / "snapshots")]
    report = run_json(args, hub_env(hub, tmp_path), tmp_path)
    jsons = sorted(p.name for p in REFERENCE.glob("*.json"))
    assert report["refs"] == ["main"] and report["commits"] == ["nested", "upload", "initial commit"]
    assert report["tree"] == sorted([".gitattributes", "sub", *jsons])
    assert report["tree_sub"] == ["sub/dir", "sub/dir/notes.txt"]
    assert report["paths_info"] == ["config.json", "sub"] and report["exists"] == [True, False]
    assert report["snapshot"] == sorted([".gitattributes", "sub", *jsons])
    assert report["after_delete"] == sorted([".gitattributes", *jsons]) and report["repo_exists"] is False


# -- errors ---------------------------------------------------------------------------------------------------------


def test_no_token_is_a_clear_error_and_sends_nothing(failures):
    results, requests, _ = failures
    result = results["no_token"]
    assert result["type"] == "HubPublishError"
    assert "No Hugging Face token" in result["message"] and "hf auth login" in result["message"]
    assert "HF_TOKEN" in result["message"]
    # It failed before any request: the first request of the run is the next attempt's.
    assert requests[0][1] == "/api/whoami-v2" and requests[0][3] == "<invalid>"


def test_rejected_token_is_a_clear_error(failures):
    results, requests, _ = failures
    result = results["bad_token"]
    assert result["type"] == "HubPublishError" and "rejected (401)" in result["message"]
    assert [path for _, path, _, user in requests if user == "<invalid>"] == ["/api/whoami-v2"]


def test_unreachable_hub_is_a_clear_error(failures):
    result = failures[0]["server_down"]
    assert result["type"] == "HubPublishError" and "connection failed" in result["message"]


def test_failed_commit_leaves_no_commit_and_a_second_push_completes(hub, failures):
    results, requests, checkpoint = failures
    for name, reason in (("dropped", "connection failed"), ("server_error", "answered 500")):
        assert results[name]["type"] == "HubPublishError", results[name]
        assert reason in results[name]["message"] and "run the same command again" in results[name]["message"]
    assert results["retry"]["ok"], results["retry"]
    repo = hub.repos[f"{USER}/flaky"]  # "flaky" was published in the token owner's namespace
    assert [c.title for c in repo.history(repo.resolve("main"))][1:] == ["initial commit"]  # one commit landed
    assert set(hub.files(f"{USER}/flaky")) == set(checkpoint_contents(checkpoint, f"{USER}/flaky")) | {".gitattributes"}
    commits = [status for method, path, status, _ in requests if method == "POST" and path.endswith("/commit/main")]
    assert commits == [None, 500, 200]
    # The weights were uploaded by the first attempt only; the retries found them stored.
    assert sum(1 for method, *_ in requests if method == "PUT") == 1


def test_existing_repo_without_exist_ok_is_a_clear_error(failures):
    result = failures[0]["exists"]
    assert result["type"] == "ValueError" and "already exists" in result["message"]


def test_private_push_to_an_existing_public_repo_is_refused(failures):
    result = failures[0]["public_but_private_asked"]
    assert result["type"] == "ValueError" and "is public" in result["message"]


# -- checks before any network call ---------------------------------------------------------------------------------


def test_incomplete_checkpoint_lists_everything_missing(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(REFERENCE, checkpoint)
    for name in ("tokenizer.json", "generation_config.json", "losses_mdm_prime.py"):
        (checkpoint / name).unlink()
    with pytest.raises(ValueError, match="Missing") as error:
        check_checkpoint(checkpoint)
    for name in ("tokenizer", "generation_config.json", "losses_mdm_prime.py"):
        assert name in str(error.value)


def test_pickle_weights_are_refused(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(REFERENCE, checkpoint)
    (checkpoint / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match="pickle"):
        check_checkpoint(checkpoint)


def test_eval_results_must_report_the_valid_bound(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(REFERENCE, checkpoint)
    results = json.loads((checkpoint / "eval_results.json").read_text())
    row = results["results"][0]
    row["ppl_bound"] = row["paper_objective_ppl"]  # a mix-up the card must not publish
    (checkpoint / "eval_results.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match="valid bound"):
        load_eval_results(checkpoint)
    (checkpoint / "eval_results.json").unlink()
    card = render_model_card(checkpoint, "user/x")
    assert "has not been evaluated" in card.text and "model-index" not in card.data.to_dict()


def import_push_to_hub():
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import push_to_hub
    finally:
        sys.path.remove(str(REPO / "examples"))
    return push_to_hub


def test_cli_dry_run_writes_what_would_be_pushed(tmp_path):
    push_to_hub = import_push_to_hub()
    staged = tmp_path / "staged"
    assert push_to_hub.main([str(REFERENCE), "user/x", "--save_to", str(staged), "--revision", "v2"]) == 0
    assert sorted(p.name for p in staged.iterdir()) == sorted(checkpoint_contents(REFERENCE, "user/x"))
    assert 'from_pretrained("user/x", trust_remote_code=True, revision="v2")' in (staged / "README.md").read_text()
    with pytest.raises(ValueError, match="not empty"):
        stage_checkpoint(REFERENCE, staged)
    with pytest.raises(SystemExit):
        push_to_hub.parse_args([str(REFERENCE)])  # neither a repo id nor --save_to


def test_hub_module_is_not_shipped_as_remote_code(saved_checkpoint):
    """The naming rule: the package's files named *_mdm_prime.py are exactly the ones shipped as remote code."""
    assert set(shipped_code_files(saved_checkpoint.path)) == SHIPPED
    package = Path(modeling_mdm_prime.__file__).parent
    assert {p.name for p in package.glob("*_mdm_prime.py")} == SHIPPED | IMAGE_CODE  # text + image models
    assert {p.name for p in saved_checkpoint.path.glob("*.py")} == SHIPPED
    assert HubPublishError.__module__ == "modeling_mdm_prime.tools.publish"


# -- the committed reference checkpoint -----------------------------------------------------------------------------


def test_reference_checkpoint_is_complete_small_and_tracked():
    files = check_checkpoint(REFERENCE)
    assert {"eval_results.json", "training_config.json", "samples.txt"} <= set(files)
    assert (REFERENCE / "README.md").is_file()
    size = sum(p.stat().st_size for p in REFERENCE.iterdir())
    assert size < 8 * 2**20, f"the reference checkpoint is {size / 2**20:.1f} MB"
    assert 0.5e6 < count_parameters(REFERENCE) < 2e6
    if shutil.which("git") and (REPO / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", str(REFERENCE / "model.safetensors")], cwd=REPO)
        assert ignored.returncode == 1, "git ignores the reference checkpoint"


def test_reference_code_is_the_package_code():
    """The committed copy of the remote code cannot drift from modeling_mdm_prime/."""
    assert set(shipped_code_files(REFERENCE)) == SHIPPED
    stale = [n for n in SHIPPED if (REFERENCE / n).read_bytes() != (REPO / "modeling_mdm_prime" / n).read_bytes()]
    assert not stale, f"{stale} differ from modeling_mdm_prime/; refresh them with:\n{REFRESH_CODE}"


def test_reference_card_is_up_to_date():
    card = render_model_card(REFERENCE, "checkpoints/mdm-prime-shakespeare-tiny", **REFERENCE_CARD_OPTIONS)
    hint = "regenerate it with the commands in docs/guides/reference-checkpoints.md"
    assert (REFERENCE / "README.md").read_text(encoding="utf-8") == str(card), hint
    assert REFERENCE_CARD.read_text(encoding="utf-8") == str(card), hint
    assert re.search(r"valid-bound perplexity ≤ [0-9.]+", card.text)


@pytest.mark.slow
@pytest.mark.parametrize("python", list(interpreters()))
def test_reference_checkpoint_loads_offline_in_a_fresh_process(reference_outputs, python, tmp_path):
    """From the repository on a machine without the Hub: remote code only, and the README snippet runs."""
    report = run_json(
        [python, "-I", "-c", LOADER, str(REFERENCE), "", PROMPT, str(NEW_TOKENS), str(REFERENCE / "README.md")],
        clean_env(tmp_path, HF_HUB_OFFLINE="1"),
        REPO,  # the card's snippet loads checkpoints/mdm-prime-shakespeare-tiny relative to the repository
    )
    assert report["class"][1].startswith("transformers_modules")
    assert report["generated"] == reference_outputs and report["snippet"] == "ran"


# -- what a push takes from the folder ------------------------------------------------------------------------------


def test_only_the_model_files_are_published_and_the_rest_is_listed(tmp_path, caplog):
    checkpoint = copy_reference(tmp_path)
    add_unrelated_files(checkpoint)
    with caplog.at_level(logging.WARNING, logger="modeling_mdm_prime"):
        files = check_checkpoint(checkpoint)
    model = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert set(files) == {*model, *SHIPPED, "eval_results.json", "samples.txt", "training_config.json"}
    (warning,) = [r.getMessage() for r in caplog.records if "Not publishing" in r.getMessage()]
    for name in ("credentials.json", "notes.txt", "helper.py", "model.safetensors.bak", "checkpoint-500/"):
        assert name in warning
    assert "README.md" not in warning  # replaced by the generated card, not left out
    staged = stage_checkpoint(checkpoint, tmp_path / "staged", model_id="user/x")
    assert sorted(p.name for p in staged.iterdir()) == sorted({*files, "README.md"})


def test_extra_files_publish_more(tmp_path, caplog):
    checkpoint = copy_reference(tmp_path)
    add_unrelated_files(checkpoint)
    published, left_out = select_files(checkpoint, extra_files=["notes.txt", "checkpoint-500/*.safetensors"])
    assert {"notes.txt", "checkpoint-500/optimizer.safetensors"} <= set(published)
    assert "notes.txt" not in left_out and "credentials.json" in left_out and "checkpoint-500/" not in left_out
    contents = checkpoint_contents(checkpoint, "user/x", extra_files=["notes.txt", "checkpoint-500/*.safetensors"])
    assert contents["checkpoint-500/optimizer.safetensors"] == checkpoint / "checkpoint-500" / "optimizer.safetensors"
    for pattern, problem in (("nope.txt", "matches no file"), ("../x", "inside"), ("README.md", "generates it")):
        with pytest.raises(ValueError, match=problem):
            select_files(checkpoint, extra_files=[pattern])


def test_cli_include_adds_files_to_the_dry_run(tmp_path, capsys):
    push_to_hub = import_push_to_hub()
    checkpoint = copy_reference(tmp_path)
    add_unrelated_files(checkpoint)
    staged = tmp_path / "staged"
    assert push_to_hub.main([str(checkpoint), "--save_to", str(staged), "--include", "notes.txt"]) == 0
    names = {p.name for p in staged.iterdir()}
    assert "notes.txt" in names and not names & {"credentials.json", "helper.py", "model.safetensors.bak"}
    assert push_to_hub.main([str(checkpoint), "--save_to", str(tmp_path / "again"), "--include", "x.txt"]) == 1
    assert "matches no file" in capsys.readouterr().err


def _torch_zip() -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, buffer)
    return buffer.getvalue()


def _npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    return buffer.getvalue()


PICKLES = {
    # name: (file name, content, what the refusal says)
    "name_upper_case": ("pytorch_model.BIN", b"whatever", "name ends in .bin"),
    "name_compressed": ("weights.pkl.gz", gzip.compress(b"x"), "name ends in .pkl"),
    "name_npy": ("arr.npy", b"x", "name ends in .npy"),
    "content_pickle": ("notes.txt", pickle.dumps({"a": 1}, protocol=4), "pickle stream (protocol 4)"),
    "content_torch_zip": ("extra.dat", _torch_zip(), "zip archive holding"),
    "content_npy": ("array.dat", _npy(), "numpy .npy array"),
    "content_gzip_pickle": ("blob.gz", gzip.compress(pickle.dumps([1, 2], protocol=2)), "gzip-compressed"),
    "weights_are_a_pickle": ("model.safetensors", _torch_zip(), "zip archive holding"),
}


@pytest.mark.parametrize("case", sorted(PICKLES))
def test_pickles_are_refused_by_name_and_by_content(case, tmp_path):
    name, content, reason = PICKLES[case]
    checkpoint = copy_reference(tmp_path)
    (checkpoint / name).write_bytes(content)
    with pytest.raises(ValueError, match="pickle") as error:
        check_checkpoint(checkpoint)
    assert name in str(error.value) and reason in str(error.value)
    assert pickle_reason(checkpoint / name) is not None


def test_files_that_are_not_pickles_pass_the_content_check(tmp_path):
    assert all(pickle_reason(path) is None for path in REFERENCE.iterdir())
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme.txt", "plain text")
    for name, content in (("plots.zip", archive.getvalue()), ("log.txt.gz", gzip.compress(b"step 1\n"))):
        (tmp_path / name).write_bytes(content)
        assert pickle_reason(tmp_path / name) is None, name


def test_weights_that_are_not_safetensors_are_refused(tmp_path):
    checkpoint = copy_reference(tmp_path)
    (checkpoint / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json, no tensors}")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        check_checkpoint(checkpoint)


def test_code_that_differs_from_the_package_is_reported(tmp_path, caplog):
    checkpoint = copy_reference(tmp_path)
    assert shipped_code_differences(checkpoint) == []
    with (checkpoint / "codec_mdm_prime.py").open("a") as f:
        f.write("# edited by hand\n")
    assert shipped_code_differences(checkpoint) == ["codec_mdm_prime.py"]
    with caplog.at_level(logging.WARNING, logger="modeling_mdm_prime"):
        checkpoint_contents(checkpoint, "user/x")
    (warning,) = [r.getMessage() for r in caplog.records if "differ from the installed package" in r.getMessage()]
    assert "codec_mdm_prime.py" in warning and "losses_mdm_prime.py" not in warning


@pytest.mark.slow
def test_wheel_ships_the_card_template_and_publishes_without_card_template(tmp_path):
    """A non-editable install has the template as package data: staging from the wheel's files alone, outside the
    repository, renders the committed card."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "modeling_mdm_prime", source / "modeling_mdm_prime", ignore=ignore)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    result = subprocess.run([*build, "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    assert "modeling_mdm_prime/tools/model_card_template.md" in names
    assert "modeling_mdm_prime/tools/model_card_image_template.md" in names
    assert not any(name.endswith("hub_mdm_prime.py") for name in names)
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import modeling_mdm_prime as m; "
        "assert m.__file__.startswith(sys.argv[1]), m.__file__; from modeling_mdm_prime.tools import stage_checkpoint; "
        "stage_checkpoint(sys.argv[2], sys.argv[3], model_id='checkpoints/mdm-prime-shakespeare-tiny', "
        "**json.loads(sys.argv[4]))"
    )
    staged = tmp_path / "staged"
    args = [str(tmp_path / "site"), str(REFERENCE), str(staged), json.dumps(REFERENCE_CARD_OPTIONS)]
    result = subprocess.run(
        [sys.executable, "-I", "-c", script, *args],
        env=clean_env(tmp_path, HF_HUB_OFFLINE="1"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (staged / "README.md").read_text(encoding="utf-8") == REFERENCE_CARD.read_text(encoding="utf-8")


# -- failures while the LFS files are uploaded ----------------------------------------------------------------------


@pytest.fixture
def online(monkeypatch):
    """This process as a client of a local Hub: online, no Xet, and huggingface_hub's retries without their waits
    (1 + 2 + 4 + 8 + 8 s by default; there is no public setting), so a persistent failure fails in well under a
    second after the same 5 retries."""
    import huggingface_hub.constants
    from huggingface_hub.utils import _http

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    defaults = _http.http_backoff.__kwdefaults__ or {}
    for key in ("base_wait_time", "max_wait_time"):
        if key in defaults:
            monkeypatch.setitem(defaults, key, 0.01)


LFS_FAILURES = {
    # name: (method, path, injected failure, how many requests fail (None: all), what the error says)
    "put_answers_500": ("PUT", r"/lfs-upload/", 500, None, "the Hub answered 500"),
    "put_dropped": ("PUT", r"/lfs-upload/", None, None, "the connection failed"),
    "server_gone_mid_upload": ("PUT", r"/lfs-upload/", DOWN, 1, "the connection failed"),
    "verify_answers_500": ("POST", r"/lfs-verify$", 500, None, "the Hub answered 500"),
}


@pytest.mark.parametrize("case", list(LFS_FAILURES))
def test_lfs_failure_is_a_hub_publish_error_and_a_second_push_completes(case, online):
    method, path, status, times, reason = LFS_FAILURES[case]
    repo_id = f"{USER}/lfs-{case.replace('_', '-')}"
    with LocalHub(tokens={TOKEN: USER}) as hub:
        hub.fail(method, path, status=status, times=times)
        start = time.perf_counter()
        with pytest.raises(HubPublishError) as error:
            publish_checkpoint(REFERENCE, repo_id, token=TOKEN, endpoint=hub.url)
        elapsed = time.perf_counter() - start
        message = str(error.value)
        assert "upload model.safetensors (LFS storage)" in message and reason in message, message
        assert "Nothing was committed" in message and "run the same command again" in message
        repo = hub.repos[repo_id]
        assert [c.title for c in repo.history(repo.resolve("main"))] == ["initial commit"]
        assert not any(m == "POST" and p.endswith("/commit/main") for m, p, *_ in hub.requests)
        attempts = sum(1 for m, p, *_ in hub.requests if m == method and re.search(path, p))
        assert attempts >= 1 if status == DOWN else attempts == 6  # the client's own 5 retries happened
        assert elapsed < 15, f"the failing push took {elapsed:.1f} s"
        # The same command again, with the server back, completes the repository.
        hub.clear_failures()
        if not hub.running:
            hub.start()
        info = publish_checkpoint(REFERENCE, repo_id, token=TOKEN, endpoint=hub.url)
        files = hub.files(repo_id)
        assert info.oid == repo.refs["main"]
        assert set(files) == set(checkpoint_contents(REFERENCE, repo_id, revision="main")) | {".gitattributes"}
        assert files["model.safetensors"] == (REFERENCE / "model.safetensors").read_bytes()


def test_a_transient_lfs_failure_is_retried_within_the_push(online):
    with LocalHub(tokens={TOKEN: USER}) as hub:
        hub.fail("PUT", r"/lfs-upload/", status=503, times=2)
        publish_checkpoint(REFERENCE, f"{USER}/lfs-transient", token=TOKEN, endpoint=hub.url)
        puts = [status for method, _, status, _ in hub.requests if method == "PUT"]
        assert puts == [503, 503, 200]
        assert "model.safetensors" in hub.files(f"{USER}/lfs-transient")


# -- image checkpoints ----------------------------------------------------------------------------------------------

# The code an image checkpoint ships besides the text model's: the image model and the U-Net it imports.
IMAGE_CODE = {"modeling_image_mdm_prime.py", "unet_mdm_prime.py"}
IMAGE_REPO_ID = f"{USER}/mdm-prime-digits-tiny"
IMAGE_ALLOWLIST = {
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "samples.png",
    "metrics.json",
    *SHIPPED,
    *IMAGE_CODE,
}

IMAGE_LOADER = r"""
import json, os, re, sys
sys.modules["modeling_mdm_prime"] = None  # only the code in the repository may be used
try:
    import modeling_mdm_prime  # noqa: F401
    raise SystemExit("modeling_mdm_prime is importable in the loader process")
except ImportError:
    pass
import torch, transformers
from huggingface_hub import snapshot_download
from transformers import AutoModel

repo_id, revision, num_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
local = snapshot_download(repo_id, revision=revision)
model = AutoModel.from_pretrained(local, trust_remote_code=True).eval()
images = model.generate(num_images=3, num_steps=num_steps, seed=0)
card = open(os.path.join(local, "README.md"), encoding="utf-8").read()
snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
scope = {}
exec(compile(snippet, "model-card-snippet", "exec"), scope)
x, completed = scope["x"], scope["completed"]
report = {
    "transformers": transformers.__version__,
    "class": [type(model).__name__, type(model).__module__],
    "files": sorted(os.listdir(local)),
    "images": images.tolist(),
    "snippet_images": list(scope["images"].shape),
    "snippet_bpd": scope["bound"].bits_per_dim.tolist(),
    # imputation kept the most significant base-b digit of every pixel: floor(level / b) is unchanged
    "kept_digit": bool(torch.equal(completed // model.codec.base, x // model.codec.base)),
}
print(json.dumps(report))
"""


def make_image_checkpoint(root: Path, *, eval_report: dict | None = None) -> Path:
    """An image checkpoint as examples/train_images.py writes it, from a small untrained model: ``final/`` with the
    weights, code, ``samples.png`` (a grid of its samples) and ``metrics.json`` (its bits per dimension on those
    samples, from the valid bound), and the run's settings in ``logs/config.json``."""
    from modeling_mdm_prime import MDMPrimeForImageDiffusion, MDMPrimeImageConfig
    from modeling_mdm_prime.tools.image_data import save_image_grid

    config = MDMPrimeImageConfig(
        num_levels=17,
        num_sub_tokens=2,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    model = MDMPrimeForImageDiffusion(config).eval()
    model.generation_config.num_steps = 8
    final = root / "final"
    model.save_pretrained(final)
    samples = model.generate(num_images=4, seed=0)
    save_image_grid(samples, config.num_levels, final / "samples.png")
    bound = model.nll_bound(samples, num_time_samples=4, generator=torch.Generator().manual_seed(0))
    metrics = {
        "val/bpd": float(bound.bits_per_dim.mean()),
        "val/bpd_stderr": float(bound.bits_per_dim.std() / 2),
        "nfe": 8,
        "num_sub_tokens": 2,
        "dataset": "digits",
    }
    (final / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (root / "logs").mkdir()
    settings = dict(dataset="digits", max_steps=30, batch_size=64, learning_rate=0.002, lr_scheduler="cosine")
    settings.update(warmup_steps=100, ema_decay=0.999, seed=0, output_dir=str(root), report_to="jsonl")
    (root / "logs" / "config.json").write_text(json.dumps(settings))
    if eval_report is not None:
        (final / "eval_images").mkdir()
        (final / "eval_images" / "eval_images.json").write_text(json.dumps(eval_report))
        (final / "eval_images" / "samples_nfe8.png").write_bytes((final / "samples.png").read_bytes())
    return final


# examples/evaluate_images.py's report for 8 × 8 digits (values are inputs of the card, not results).
DIGITS_EVAL = {
    "model": "/home/someone/outputs/train_images/final",
    "dataset": "digits",
    "bits_per_dim": {"bits_per_dim": 1.2345, "bits_per_dim_stderr": 0.0123, "num_images": 360, "num_time_samples": 16},
    "sample_metric": "classifier Fréchet distance (CFD, not FID)",
    "feature_network": "digits CNN (2 conv + 128-d hidden layer, trained on the scikit-learn digits train split)",
    "num_reference": 1437,
    "samples": [
        {"nfe": 8, "network_evaluations": 8.0, "classifier_frechet_distance": 5.4321, "coverage": 0.97},
        {"nfe": 64, "network_evaluations": 64.0, "classifier_frechet_distance": 2.3456, "coverage": 0.99},
    ],
    "real_baseline": {"images": "360 real held-out images", "classifier_frechet_distance": 0.4567},
}


@pytest.fixture(scope="module")
def image_checkpoint(tmp_path_factory) -> Path:
    return make_image_checkpoint(tmp_path_factory.mktemp("image-run"))


def copy_image_checkpoint(source: Path, tmp_path: Path) -> Path:
    """A copy of the whole run (``final/`` and ``logs/``); returns the copy of ``final/``."""
    shutil.copytree(source.parent, tmp_path / "image-run")
    return tmp_path / "image-run" / source.name


def test_image_checkpoint_publishes_its_allowlist_without_a_tokenizer(image_checkpoint, tmp_path, caplog):
    checkpoint = copy_image_checkpoint(image_checkpoint, tmp_path)
    add_unrelated_files(checkpoint)
    (checkpoint / "tokenizer.json").write_text("{}")  # a text model's file: not part of an image model
    (checkpoint / "samples.txt").write_text("not an image model's samples\n")
    assert is_image_checkpoint(checkpoint) and not is_image_checkpoint(REFERENCE)
    assert set(shipped_code_files(checkpoint)) == SHIPPED | IMAGE_CODE
    with caplog.at_level(logging.WARNING, logger="modeling_mdm_prime"):
        files = check_checkpoint(checkpoint)
    assert set(files) == IMAGE_ALLOWLIST
    (warning,) = [r.getMessage() for r in caplog.records if "Not publishing" in r.getMessage()]
    for name in ("credentials.json", "notes.txt", "helper.py", "model.safetensors.bak", "checkpoint-500/"):
        assert name in warning
    assert "tokenizer.json" in warning and "samples.txt" in warning
    # The CLI, unchanged and without tokenizer arguments: the dry run writes exactly what a push uploads.
    push_to_hub = import_push_to_hub()
    staged = tmp_path / "staged"
    assert push_to_hub.main([str(checkpoint), IMAGE_REPO_ID, "--save_to", str(staged)]) == 0
    assert {p.name for p in staged.iterdir()} == IMAGE_ALLOWLIST | {"README.md", "training_config.json"}
    for name in IMAGE_ALLOWLIST:
        assert (staged / name).read_bytes() == (checkpoint / name).read_bytes(), name
    training = json.loads((staged / "training_config.json").read_text())
    assert training["dataset"] == "digits" and "output_dir" not in training  # the run's settings, path-free


def test_image_checkpoint_needs_weights_and_code_but_no_tokenizer(image_checkpoint, tmp_path):
    checkpoint = copy_image_checkpoint(image_checkpoint, tmp_path)
    for name in ("model.safetensors", "unet_mdm_prime.py"):
        (checkpoint / name).unlink()
    with pytest.raises(ValueError, match="Missing") as error:
        check_checkpoint(checkpoint)
    message = str(error.value)
    assert "model.safetensors" in message and "unet_mdm_prime.py" in message and "tokenizer" not in message


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("samples.png", b"GIF89a not a png", "not a PNG"),
        ("metrics.json", b'{"val/bpd": "low"}', "'val/bpd' must be a float"),
        ("metrics.json", b'{"val/bpd": 1.0, "num_sub_tokens": 4}', "another model's metrics"),
        ("eval_images.json", b'{"samples": [{"nfe": 8, "fid": 3.0}]}', "feature_network"),
        ("eval_images.json", b'{"dataset": "digits"}', "nothing to report"),
    ],
)
def test_image_files_must_be_what_they_say(image_checkpoint, tmp_path, name, content, problem):
    checkpoint = copy_image_checkpoint(image_checkpoint, tmp_path)
    (checkpoint / name).write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(problem)):
        check_checkpoint(checkpoint)


@pytest.mark.parametrize("case", sorted(PICKLES))
def test_pickles_in_an_image_checkpoint_are_refused(image_checkpoint, tmp_path, case):
    name, content, reason = PICKLES[case]
    checkpoint = copy_image_checkpoint(image_checkpoint, tmp_path)
    (checkpoint / name).write_bytes(content)
    with pytest.raises(ValueError, match="pickle") as error:
        check_checkpoint(checkpoint)
    assert name in str(error.value) and reason in str(error.value)


def test_image_card_has_the_grid_the_bound_and_no_text_generation_tag(image_checkpoint):
    from huggingface_hub import ModelCard

    card = ModelCard(str(render_model_card(image_checkpoint, IMAGE_REPO_ID, revision="v1", license="apache-2.0")))
    data = card.data.to_dict()
    metadata = str(card).split("\n---\n", 1)[0]
    assert data["library_name"] == "transformers" and data["inference"] is False and data["license"] == "apache-2.0"
    assert {"mdm-prime", "diffusion", "masked-diffusion", "image-generation", "custom_code"} <= set(data["tags"])
    assert (
        "pipeline_tag" not in data and "text-generation" not in metadata and "diffusion-language-model" not in metadata
    )
    assert "datasets" not in data  # "digits" is the embedded scikit-learn set, not a Hub dataset id
    metrics = json.loads((image_checkpoint / "metrics.json").read_text())
    (entry,) = data["model-index"]
    (result,) = entry["results"]
    assert result["task"]["type"] == "unconditional-image-generation" and "split" not in result["dataset"]
    assert [m["type"] for m in result["metrics"]] == ["bits_per_dim"]
    assert result["metrics"][0]["value"] == pytest.approx(metrics["val/bpd"], abs=1e-4)
    body = card.text
    assert "![samples](samples.png)" in body and "NFE = 8" in body
    bound_row = f"| {metrics['val/bpd']:.4f} ± {metrics['val/bpd_stderr']:.4f} | digits (from `metrics.json`) |"
    assert bound_row in body and "| NFE of the samples above | 8 |" in body
    assert "| image shape | 1 × 8 × 8" in body and "ℓ = 2, base b = 5" in body and "`elbo` (the valid bound)" in body
    assert "model.generate(num_images=16, num_steps=64, seed=0)" in body
    assert "model.generate(pixel_values=x, keep_digits=[True, False], seed=0)" in body
    assert "model.nll_bound(x, num_time_samples=16)" in body and "bits_per_dim" in body
    assert 'from_pretrained("user/mdm-prime-digits-tiny", trust_remote_code=True, revision="v1")' in body
    assert "AutoTokenizer" not in body and "not been evaluated" not in body and "## License" in body


def test_image_card_labels_the_paper_objective_and_cfd(image_checkpoint, tmp_path):
    """An evaluation report at evaluate_images.py's default place is published at the top level, path-free, and
    its classifier Fréchet distances reach the card and the metadata, labelled as not FID, with their network."""
    checkpoint = make_image_checkpoint(tmp_path / "run", eval_report=DIGITS_EVAL)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "loss_type": "cross_entropy"}))
    published, left_out = select_files(checkpoint)
    assert "eval_images/eval_images.json" in published and "eval_images/samples_nfe8.png" in left_out
    contents = checkpoint_contents(checkpoint, IMAGE_REPO_ID)
    assert set(contents) == IMAGE_ALLOWLIST | {"README.md", "training_config.json", "eval_images.json"}
    published_report = json.loads(contents["eval_images.json"])
    assert published_report["model"] == "final" and published_report["samples"] == DIGITS_EVAL["samples"]
    card = render_model_card(checkpoint, IMAGE_REPO_ID)
    body = card.text
    assert "the paper's image objective" in body and "**not a bound**" in body
    assert "| bits per dimension (valid bound, ≤) | 1.2345 ± 0.0123 | digits, 360 held-out images" in body
    assert "| classifier Fréchet distance (CFD, not FID) | 5.432 | NFE 8, class coverage 0.97" in body
    assert "| classifier Fréchet distance (CFD, not FID) | 2.346 | NFE 64" in body and "0.457" in body
    assert DIGITS_EVAL["feature_network"] in body and "**not FID**" in body
    metrics = {m["name"]: m["value"] for m in card.data.to_dict()["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {
        "bits per dimension (valid bound, upper bound on NLL)": 1.2345,
        "classifier Fréchet distance (CFD, not FID) at NFE 8": 5.4321,
        "classifier Fréchet distance (CFD, not FID) at NFE 64": 2.3456,
    }
    # An FID report names the Inception network and is not called "not FID".
    fid = {**DIGITS_EVAL, "feature_network": "FID Inception-v3 (TorchScript default_1.pt)", "real_baseline": None}
    fid["samples"] = [{"nfe": 16, "fid": 12.5}]
    (checkpoint / "eval_images.json").write_text(json.dumps(fid))  # the top-level report takes precedence
    body = render_model_card(checkpoint, IMAGE_REPO_ID).text
    assert "| FID | 12.500 | NFE 16" in body and "FID Inception-v3" in body and "not FID" not in body


@pytest.mark.slow
@pytest.mark.parametrize("python", list(interpreters()))
def test_image_checkpoint_round_trip_through_the_hub(image_checkpoint, online, python, tmp_path):
    """Publish to the local Hub, then in a fresh process where the package is not importable (transformers 5.x and
    4.57): download the snapshot, load it with AutoModel and trust_remote_code, generate (the seeded images equal
    this process's), and run the card's snippet as written (sampling, imputation that keeps every fixed digit, bits
    per dimension)."""
    from modeling_mdm_prime import MDMPrimeForImageDiffusion

    with LocalHub(tokens={TOKEN: USER}) as hub:
        info = publish_checkpoint(image_checkpoint, IMAGE_REPO_ID, token=TOKEN, endpoint=hub.url, license="mit")
        files = hub.files(IMAGE_REPO_ID)
        assert info.oid == hub.repos[IMAGE_REPO_ID].refs["main"]
        assert info.commit_message.startswith("Publish checkpoint") and "bits per dimension <=" in info.commit_message
        assert set(files) == IMAGE_ALLOWLIST | {"README.md", "training_config.json", ".gitattributes"}
        for name in IMAGE_ALLOWLIST:
            assert files[name] == (image_checkpoint / name).read_bytes(), name
        readme = files["README.md"].decode()
        assert "![samples](samples.png)" in readme and "text-generation" not in readme.split("\n---\n", 1)[0]
        report = run_json(
            [python, "-I", "-c", IMAGE_LOADER, IMAGE_REPO_ID, "main", "8"], hub_env(hub, tmp_path), tmp_path
        )
    assert report["class"][0] == "MDMPrimeForImageDiffusion" and report["class"][1].startswith("transformers_modules")
    assert set(report["files"]) == set(files)
    model = MDMPrimeForImageDiffusion.from_pretrained(image_checkpoint).eval()
    expected = model.generate(num_images=3, num_steps=8, seed=0)
    assert report["images"] == expected.tolist() and expected.shape == (3, 1, 8, 8)
    assert report["snippet_images"] == [16, 1, 8, 8] and report["kept_digit"]
    assert len(report["snippet_bpd"]) == 4 and all(0 < b < math.log2(17) * 2 for b in report["snippet_bpd"])
