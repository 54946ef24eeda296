"""Every python block of README.md and docs/ runs as written, in a fresh process, without an interactive prompt.
README's blocks are in the fast tier, the docs' in the slow one."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fresh_interpreter import tf4_python

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
CASES = [
    (page.relative_to(REPO).as_posix(), index, code)
    for page in PAGES
    for index, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
]
BLOCKS = [code for _, _, code in CASES]


def run_block(python: str, code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf"))
    return subprocess.run(
        [python, "-c", code], cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_readme_and_docs_have_python_blocks():
    assert sum(page == "README.md" for page, _, _ in CASES) >= 1 and len(BLOCKS) >= 6


@pytest.mark.parametrize(
    "code",
    [
        pytest.param(code, id=f"{page}-{index}", marks=[] if page == "README.md" else [pytest.mark.slow])
        for page, index, code in CASES
    ],
)
def test_readme_block_runs(code, tmp_path):
    result = run_block(sys.executable, code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[y/N]" not in result.stdout + result.stderr


@pytest.mark.slow
def test_readme_snippets_without_the_package_on_transformers_4_57(tmp_path):
    """The blocks that need only the checkpoint's code run on transformers 4.57 too."""
    python = tf4_python()
    if python is None:
        if os.environ.get("MDM_PRIME_REQUIRE_TF4") == "1":
            pytest.fail("MDM_PRIME_REQUIRE_TF4=1 but no transformers 4.57 interpreter was found")
        pytest.skip("no transformers 4.57 env (.ci/run builds one)")
    for code in BLOCKS:
        # Blocks that import the package, or start one of its scripts (examples/serve.py), need the package.
        if "modeling_mdm_prime" in code or "examples/" in code:
            continue
        result = run_block(python, 'import sys; sys.modules["modeling_mdm_prime"] = None\n' + code, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "[y/N]" not in result.stdout + result.stderr
