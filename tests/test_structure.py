"""The package's one hard boundary: the shipped remote code is exactly the ``*_mdm_prime.py`` files at the top of
``modeling_mdm_prime/``; everything else lives in ``modeling_mdm_prime/tools/`` and is never shipped."""

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from modeling_mdm_prime import MDMPrimeForImageDiffusion, MDMPrimeImageConfig
from modeling_mdm_prime._deprecated import MOVED
from modeling_mdm_prime.tools import shipped_code_files

PACKAGE = Path(__file__).resolve().parents[1] / "modeling_mdm_prime"
SHIPPED = sorted(p.name for p in PACKAGE.glob("*_mdm_prime.py"))
# What remote code may import besides its siblings: torch, transformers and the standard library (no I/O modules).
LIBRARIES = {"torch", "transformers", "__future__", "math", "numbers", "copy", "dataclasses", "typing", "collections"}
LIBRARIES |= {"contextlib", "functools", "itertools", "warnings", "inspect", "enum", "abc", "PIL"}  # PIL: levels_to_pil


def _imports(path: Path) -> list[tuple[int, str | None, int]]:
    """(level, module, line) of every import statement in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((0, alias.name, node.lineno) for alias in node.names)
    return found


def test_saved_checkpoints_ship_exactly_the_top_level_mdm_prime_files(tmp_path, saved_checkpoint):
    text, image = saved_checkpoint.path, tmp_path / "image"
    config = MDMPrimeImageConfig(
        num_channels=1, height=4, width=4, num_levels=16, num_sub_tokens=2, hidden_size=16, num_hidden_layers=1
    )
    MDMPrimeForImageDiffusion(config).save_pretrained(image)
    shipped = set(shipped_code_files(text)) | set(shipped_code_files(image))
    assert sorted(shipped) == SHIPPED
    on_disk = {p.name for folder in (text, image) for p in folder.glob("*.py")}
    assert on_disk == shipped  # save_pretrained copied nothing else


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_files_import_only_siblings_and_libraries(name):
    for level, module, line in _imports(PACKAGE / name):
        where = f"{name}:{line}"
        if level:
            assert level == 1 and module and module.endswith("_mdm_prime"), f"{where}: from {'.' * level}{module}"
        else:
            assert not module.startswith("modeling_mdm_prime"), f"{where}: import {module}"
            assert module.split(".")[0] in LIBRARIES, f"{where}: import {module}"


@pytest.mark.parametrize("modeling", ["modeling_mdm_prime.py", "modeling_image_mdm_prime.py"])
def test_each_modeling_file_imports_every_file_it_needs_directly(modeling):
    """transformers 4.57 copies only the direct relative imports of the file ``auto_map`` names into its module
    cache, so a file reached only through another shipped file is missing there (environment.md's trap)."""

    def direct(name: str) -> set[str]:
        return {f"{module}.py" for level, module, _ in _imports(PACKAGE / name) if level}

    needed, pending = set(), list(direct(modeling))
    while pending:
        name = pending.pop()
        if name not in needed:
            needed.add(name)
            pending.extend(direct(name))
    assert needed - {modeling} <= direct(modeling), f"{modeling} must import {sorted(needed - direct(modeling))}"


def test_nothing_else_lives_at_the_top_level():
    """Besides the shipped files: the package's __init__ and the deprecated aliases of the moved tools."""
    others = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in SHIPPED)
    assert others == sorted(["__init__.py", "_deprecated.py", *(f"{name}.py" for name in MOVED)])
    for name in MOVED:
        assert len((PACKAGE / f"{name}.py").read_text().splitlines()) <= 12, f"{name}.py is more than an alias"
    assert all(not p.name.endswith("_mdm_prime.py") for p in (PACKAGE / "tools").glob("*.py"))


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_warn_and_alias_the_new_ones(old):
    sys.modules.pop(f"modeling_mdm_prime.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"modeling_mdm_prime.{old} moved to {MOVED[old]}"):
        module = importlib.import_module(f"modeling_mdm_prime.{old}")
    assert module is importlib.import_module(MOVED[old])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.import_module(MOVED[old])  # the new path does not warn


@pytest.mark.slow
def test_old_lm_eval_entry_point_still_runs():
    result = subprocess.run(
        [sys.executable, "-m", "modeling_mdm_prime.lm_eval_adapter", "--help"], capture_output=True, text=True,
        timeout=120, cwd=PACKAGE.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--model_args" in result.stdout


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_docstrings_point_to_pages_that_exist(name):
    """Shipped files travel into every checkpoint, where the project's specs cannot be opened: they explain
    themselves or name a docs/ page of the repository, and every page they name exists."""
    import re

    text = (PACKAGE / name).read_text(encoding="utf-8")
    assert "method.md" not in text
    for page in re.findall(r"docs/[\w/.-]+\.md", text):
        assert (PACKAGE.parent / page).is_file(), f"{name} names {page}, which does not exist"
