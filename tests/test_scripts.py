"""Paths every user hits first: each script's --help, the repository standing on its own (no ../shared), and the
teardown that keeps a DDP run from hanging at exit."""

import argparse
import ast
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from conftest import GPT2_TOKENIZER

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    path.relative_to(REPO).as_posix()
    for folder in ("examples", "benchmarks")
    for path in (REPO / folder).glob("*.py")
    if 'if __name__ == "__main__"' in path.read_text(encoding="utf-8")
)


def test_every_script_is_found():
    assert {"examples/pretrain.py", "examples/finetune.py", "examples/evaluate_ppl.py"} <= set(SCRIPTS)
    assert any(s.startswith("benchmarks/") for s in SCRIPTS)


def help_parsers(script: str, monkeypatch, capsys) -> tuple[list[argparse.ArgumentParser], str]:
    """``python SCRIPT --help`` through the script's real parser (run in-process: one interpreter for all): the
    parsers that printed help, and the text."""
    parsers: list[argparse.ArgumentParser] = []
    print_help = argparse.ArgumentParser.print_help

    def spy(self, file=None):
        parsers.append(self)
        return print_help(self, file)

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", spy)
    monkeypatch.setattr(sys, "argv", [str(REPO / script), "--help"])
    monkeypatch.syspath_prepend(str(REPO / Path(script).parent))
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert exited.value.code in (0, None), capsys.readouterr().err
    assert parsers, f"{script} --help printed no argparse help"
    return parsers, capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0_and_describes_every_flag(script, monkeypatch, capsys):
    parsers, text = help_parsers(script, monkeypatch, capsys)
    assert "usage:" in text
    undescribed = [
        "/".join(action.option_strings) or action.dest
        for parser in parsers
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        and action.help is not argparse.SUPPRESS
        and not re.sub(r"\(default: [^)]*\)", "", action.help or "").strip()
    ]
    assert not undescribed, f"{script}: flags without a description: {undescribed}"


# One name per concept (modeling_mdm_prime/tools/cli.py): these may only be aliases after the canonical flag.
SYNONYMS = {
    "--model": "--model_name_or_path",
    "--checkpoint": "--model_name_or_path",
    "--mc_samples": "--num_time_samples",
    "--time_samples": "--num_time_samples",
    "--eval_repeats": "--eval_time_samples",
    "--samples": "--num_samples",
    "--hidden": "--hidden_size",
    "--layers": "--num_hidden_layers",
    "--num_layers": "--num_hidden_layers",
    "--heads": "--num_attention_heads",
    "--num_heads": "--num_attention_heads",
    "--lr": "--learning_rate",
    "--batch": "--batch_size",
    "--bpe_vocab": "--bpe_vocab_size",
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_speaks_one_vocabulary(script, monkeypatch, capsys):
    """Each flag's canonical (first) spelling uses underscores and is the package's name for its concept; a
    Monte-Carlo draw count is always ``*_time_samples``; the card's dataset is never plain ``--dataset``."""
    parsers, _ = help_parsers(script, monkeypatch, capsys)
    for parser in parsers:
        for action in parser._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            if not longs or isinstance(action, argparse._HelpAction):
                continue
            canonical = longs[0]
            assert "-" not in canonical[2:], f"{script}: {canonical} is hyphenated; spell it with underscores"
            assert canonical not in SYNONYMS, f"{script}: {canonical} should be {SYNONYMS[canonical]}"
            if re.match(r"Monte-Carlo (draws|time samples)", action.help or ""):
                assert canonical.endswith("time_samples"), f"{script}: {canonical} counts Monte-Carlo draws"
            if canonical == "--dataset":
                assert "card" not in (action.help or ""), f"{script}: the card's dataset is --card_dataset"


def test_old_spellings_still_parse(monkeypatch, capsys):
    """Renamed flags keep their old spelling as an alias (scripts and configs users already have keep working)."""
    from modeling_mdm_prime.tools.cli import add_sized_arguments, option_strings, sized_defaults

    assert option_strings("num_time_samples") == ["--num_time_samples", "--num-time-samples"]
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    add_sized_arguments(parser, {"batch_size": 16, "seq_len": 128}, {"batch_size": 2, "seq_len": 8})
    args = sized_defaults(parser.parse_args(["--batch-size", "3", "--tiny"]), {"batch_size": 16, "seq_len": 128},
                          {"batch_size": 2, "seq_len": 8})  # fmt: skip
    assert (args.batch_size, args.seq_len) == (3, 8)
    with pytest.raises(ValueError, match="missing help"):
        add_sized_arguments(argparse.ArgumentParser(), {"nonsense": 1}, {"nonsense": 0})
    parsers, _ = help_parsers("examples/evaluate_ppl.py", monkeypatch, capsys)
    (parser,) = parsers
    assert parser.parse_args(["--model", "somewhere"]).model_name_or_path == "somewhere"


def test_benchmarks_do_not_import_the_example_scripts():
    """Benchmarks use the library (``modeling_mdm_prime.tools``), not ``examples/*.py`` through ``sys.path``; the
    one exception measures ``examples/pretrain.py`` itself."""
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        if path.name == "default_budget.py":
            continue
        text = path.read_text(encoding="utf-8")
        assert '"examples")' not in text and "from pretrain import" not in text, path.name


@pytest.mark.slow
def test_finetune_help_in_a_fresh_process():
    """The crash users saw: a '%' in a help string breaks argparse's formatting (``TypeError: %o format``)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "finetune.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--validation_size" in result.stdout


def test_the_repository_does_not_reach_outside_itself():
    """No code, config or README command depends on ../shared (or any folder beside the clone)."""
    offenders = []
    for path in REPO.rglob("*"):
        relative = path.relative_to(REPO).as_posix()
        if not path.is_file() or relative.startswith(
            (".venv", ".git/", "outputs/", "checkpoints/", "tests/test_scripts")
        ):
            continue
        if path.suffix not in (".py", ".sh", ".cfg", ".toml", ".yaml", ".yml", ".md") and path.name != "run":
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for line_number, line in enumerate(text.splitlines(), 1):
            if re.search(r"\.\./shared/data|parents\[2\]\s*/\s*\"shared\"|/work/shared", line):
                offenders.append(f"{relative}:{line_number}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)


def test_the_committed_gpt2_tokenizer_is_gpt2():
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(GPT2_TOKENIZER))
    assert len(tokenizer) == 50257
    assert tokenizer.encode("Hello world, the quick brown fox.") == [15496, 995, 11, 262, 2068, 7586, 21831, 13]


def test_the_default_corpus_is_package_data():
    """The default of the training data exists in a wheel too: it is listed as package data in setup.cfg."""
    from modeling_mdm_prime.tools.data import BUNDLED_CORPUS, DataConfig

    assert Path(DataConfig().dataset) == BUNDLED_CORPUS and BUNDLED_CORPUS.is_file()
    package = REPO / "modeling_mdm_prime"
    assert BUNDLED_CORPUS.is_relative_to(package)
    setup = (REPO / "setup.cfg").read_text()
    patterns = re.search(r"^modeling_mdm_prime = (.*)$", setup, re.MULTILINE).group(1).split(", ")
    assert any(BUNDLED_CORPUS.relative_to(package).match(p) for p in patterns), patterns


def test_converter_default_tokenizer_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    from modeling_mdm_prime.tools.convert import load_tokenizer

    with pytest.raises(ValueError, match=r"default tokenizer 'gpt2'.*--tokenizer DIR"):
        load_tokenizer(None)
    assert len(load_tokenizer(GPT2_TOKENIZER.parent)) == 50257


# -- DDP teardown ------------------------------------------------------------------------------------------------------


def test_end_run_destroys_the_process_group(tmp_path):
    """In a fresh process: a gloo group is up, end_run tears it down before the interpreter exits."""
    code = f"""
import torch.distributed as dist
from modeling_mdm_prime.tools.training import end_run
dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
dist.barrier()
assert dist.is_initialized()
end_run()
print("initialized after end_run:", dist.is_initialized())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "initialized after end_run: False" in result.stdout


def _calls(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    }


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.startswith("examples/")])
def test_every_distributed_script_ends_its_run(script):
    calls = _calls(REPO / script)
    if calls & {"Accelerator", "make_accelerator", "Trainer"}:
        assert "end_run" in calls, f"{script} sets up a (possibly distributed) run but never calls end_run"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_main_with_argv(script):
    """One calling convention: ``main(argv=None)``, so a script runs from Python (tests, notebooks) as from a shell."""
    tree = ast.parse((REPO / script).read_text(encoding="utf-8"))
    (main,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"]
    names = [a.arg for a in main.args.args]
    assert names == ["argv"] and len(main.args.defaults) == 1, f"{script}: main({', '.join(names)})"
