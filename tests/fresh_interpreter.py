"""Fresh-process checks without a fresh process per check.

Loading a checkpoint "the way users arrive" means an interpreter in which ``modeling_mdm_prime`` cannot be imported,
so that only the checkpoint's own files (through ``trust_remote_code``) can define the model, on each transformers
line. Starting such an interpreter costs torch's and transformers' import time (~5-10 s on 2 cores), and the suite
has about a dozen of these checks. So the suite starts one worker per interpreter (transformers 5.x, 4.57) and sends
it every case: a script and its ``sys.argv``, run as ``python -I -c SCRIPT ARGS`` would run it.

What is shared between cases, and why that keeps the check honest:
- the worker blocks ``modeling_mdm_prime`` before any case runs (``sys.modules[...] = None``), as each case also does;
- after each case every ``transformers_modules.*`` module is dropped, so the next case imports its checkpoint's code
  from the files again, as a fresh process would; the default dtype is reset;
- the Hub tests keep their own processes: huggingface_hub reads ``HF_ENDPOINT`` at import, once per process.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import contextlib, io, json, os, sys, traceback
sys.modules["modeling_mdm_prime"] = None
import torch, transformers  # once: this is the import time the worker saves

# The replies go to a private copy of fd 1; fd 1 itself goes to stderr, so that nothing a case prints (C code
# included) can corrupt them.
protocol = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
for line in sys.stdin:
    request = json.loads(line)
    out, err, code = io.StringIO(), io.StringIO(), 0
    os.chdir(request["cwd"])
    sys.argv = ["-c", *request["argv"]]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            exec(compile(request["code"], "<case>", "exec"), {"__name__": "__main__"})
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, (int, type(None))):
            err.write(str(stop.code))
    except BaseException:
        code = 1
        err.write(traceback.format_exc())
    for name in [n for n in sys.modules if n == "transformers_modules" or n.startswith("transformers_modules.")]:
        del sys.modules[name]
    torch.set_default_dtype(torch.float32)
    protocol.write(json.dumps({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}) + "\n")
    protocol.flush()
"""


@dataclass
class Result:
    """What ``subprocess.run(..., capture_output=True, text=True)`` would have returned."""

    returncode: int
    stdout: str
    stderr: str


class FreshInterpreter:
    """One long-lived ``python -I`` worker; :meth:`run` runs a script in it as if in a new process."""

    def __init__(self, python: str):
        self.python = python
        self.home = Path(tempfile.mkdtemp(prefix="mdm-prime-fresh-"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.update(HF_HUB_OFFLINE="1", HF_HOME=str(self.home / "hf"), HF_MODULES_CACHE=str(self.home / "modules"))
        self.log = open(self.home / "worker.stderr", "w+")  # noqa: SIM115 - lives as long as the worker
        self.process = subprocess.Popen(
            [python, "-I", "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            cwd=self.home, env=env, text=True, bufsize=1,
        )  # fmt: skip

    def run(self, code: str, argv: list[str], cwd: Path | str, timeout: float = 300) -> Result:
        if self.process.poll() is not None:
            raise RuntimeError(f"the {self.python} worker has exited: {self.stderr_tail()}")
        request = {"code": code, "argv": [str(a) for a in argv], "cwd": str(cwd)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise TimeoutError(f"a case ran longer than {timeout} s in the {self.python} worker")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.python} worker died: {self.stderr_tail()}")
        return Result(**json.loads(line))

    def stderr_tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def tf4_python() -> str | None:
    """A transformers 4.57 interpreter: ``MDM_PRIME_TF4_PYTHON``, or the ``.venv-tf4`` that .ci/run builds."""
    candidate = os.environ.get("MDM_PRIME_TF4_PYTHON") or str(REPO / ".venv-tf4" / "bin" / "python")
    return candidate if Path(candidate).exists() else None


def interpreters():
    """pytest params ``(python, version)`` for both transformers lines. Without a 4.57 interpreter its cases are
    skipped, unless ``MDM_PRIME_REQUIRE_TF4=1`` (CI): then ``python`` is None and :func:`run_fresh` fails the test."""
    import pytest

    yield pytest.param(sys.executable, "5.", id="transformers-5")
    python = tf4_python()
    marks = []
    if python is None and os.environ.get("MDM_PRIME_REQUIRE_TF4") != "1":
        marks = [pytest.mark.skip("no transformers 4.57 env (.ci/run builds one)")]
    yield pytest.param(python, "4.57", id="transformers-4.57", marks=marks)
