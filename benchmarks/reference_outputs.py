"""Fingerprint the committed reference checkpoints' behaviour, to compare two commits of the repository.

    python benchmarks/reference_outputs.py                 # this checkout
    git worktree add /tmp/old <commit> && python benchmarks/reference_outputs.py --repo /tmp/old

Prints one JSON line: a hash of seeded text generation (and its last tokens), the continuous-time ``nll_bound`` of
two prompts with a fixed generator, and a hash of seeded image generation. Each checkpoint is loaded with
``trust_remote_code=True``, so the code that runs is the checkpoint's own copy at that commit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import warnings
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]


def fingerprint(repo: Path) -> dict:
    text = repo / "checkpoints" / "mdm-prime-shakespeare-tiny"
    model = AutoModel.from_pretrained(text, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(text, trust_remote_code=True, padding_side="left")
    batch = tok(["ROMEO:", "JULIET: O Romeo, Romeo!"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=32, seed=0)
    bound = model.nll_bound(**batch, num_samples=16, generator=torch.Generator().manual_seed(0))
    image = AutoModel.from_pretrained(repo / "checkpoints" / "mdm-prime-digits-tiny", trust_remote_code=True).eval()
    pixels = image.generate(num_images=2, seed=0)
    pixels = pixels if isinstance(pixels, torch.Tensor) else pixels.sequences
    return {
        "generate": hashlib.sha256(out.numpy().tobytes()).hexdigest()[:16],
        "text": tok.decode(out[0][-12:]),
        "nll_bound": [round(v, 6) for v in bound.nll.tolist()],
        "image_generate": hashlib.sha256(pixels.numpy().tobytes()).hexdigest()[:16],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose checkpoints/ to load (default: this)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    result = fingerprint(args.repo)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
