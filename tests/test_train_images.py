"""examples/train_images.py end to end: a short run on the bundled digits writes a loadable checkpoint, a sample
grid and held-out bits per dimension; a run stopped and resumed equals the uninterrupted run exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_images.py"
TINY = [
    "--hidden_size", "32", "--intermediate_size", "64", "--num_hidden_layers", "1", "--num_attention_heads", "2",
    "--batch_size", "16", "--max_steps", "6", "--warmup_steps", "2", "--eval_every", "3", "--eval_images", "24",
    "--eval_time_samples", "2", "--checkpoint_every", "3", "--num_samples", "10", "--sample_steps", "8",
    "--log_every", "1", "--report_to", "jsonl", "--cpu",
]  # fmt: skip


def run(args, timeout=240):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr + result.stdout


def test_train_images_runs_end_to_end_and_resumes_exactly(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    log = run(["--output_dir", str(whole)])
    assert "held-out bits per dimension <=" in log
    final = whole / "final"
    metrics = json.loads((final / "metrics.json").read_text())
    assert 0 < metrics["val/bpd"] < 4.0875 + 0.5 and metrics["val/bpd_stderr"] > 0  # log2(17) = 4.0875 is uniform
    grid = Image.open(final / "samples.png")
    assert grid.size[0] > 8 and grid.mode in ("L", "RGB")
    model = AutoModel.from_pretrained(final, trust_remote_code=True)
    assert type(model).__name__ == "MDMPrimeForImageDiffusion" and model.generation_config.num_steps == 8
    images = model.generate(num_images=3, seed=0)
    assert images.shape == (3, 1, 8, 8) and int(images.max()) < 17

    # Stopped after 3 steps, then resumed from the latest checkpoint: the same weights and EMA as the whole run.
    run(["--output_dir", str(parts), "--stop_after_steps", "3"])
    assert not (parts / "final").exists()
    run(["--output_dir", str(parts), "--resume_from_checkpoint", "latest"])
    a, b = load_file(final / "model.safetensors"), load_file(parts / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((parts / "logs" / "config.json").read_text())
    assert [r["step"] for r in config["resumes"]] == [3]
    # A fresh run into a folder with checkpoints is refused rather than mixed with the earlier run.
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--output_dir", str(parts)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "--resume_from_checkpoint latest" in result.stderr
