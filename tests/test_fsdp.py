"""examples/pretrain.py under FSDP (the shipped examples/accelerate_configs/fsdp.yaml, FSDP2): the same losses as
data parallelism (or one process on a one-GPU machine), checkpoint and exact resume, and a loadable final/.

GPU only. accelerate (1.15) turns a launch into FSDP only on top of a GPU-type backend: with ``--cpu`` the FSDP
config silently becomes MULTI_CPU, i.e. DDP with gloo (the model comes back wrapped in DistributedDataParallel),
and without it a machine with no GPU gets ``DistributedType.NO`` in every process. So on CPU this file skips, and
``benchmarks/gpu_suite.sh`` runs it on CUDA (``MDM_PRIME_FSDP_DEVICE=cuda`` makes a missing GPU an error there).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_pretrain import TINY, free_port, logged

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "pretrain.py"
FSDP_CONFIG = REPO / "examples" / "accelerate_configs" / "fsdp.yaml"
STEPS = ["--max_steps", "6", "--checkpoint_every", "3", "--eval_every", "3"]
GPU_ARGS = [*(arg for arg in TINY if arg != "--cpu"), *STEPS]

if os.environ.get("MDM_PRIME_FSDP_DEVICE") == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("MDM_PRIME_FSDP_DEVICE=cuda but torch.cuda.is_available() is False")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="FSDP needs a GPU: accelerate turns the FSDP config into DDP (MULTI_CPU, gloo) on CPU; "
    "benchmarks/gpu_suite.sh runs this file on CUDA",
)


def launch(args: list[str], processes: int, fsdp: bool, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes",
               str(processes), "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port())]  # fmt: skip
    if fsdp:
        command += ["--config_file", str(FSDP_CONFIG)]
    elif processes > 1:
        command += ["--multi_gpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_fsdp_matches_data_parallel_resumes_exactly_and_saves_a_loadable_model(tmp_path):
    processes = min(2, torch.cuda.device_count())
    launch([*GPU_ARGS, "--output_dir", str(tmp_path / "reference")], processes, fsdp=False)
    launch([*GPU_ARGS, "--output_dir", str(tmp_path / "fsdp")], processes, fsdp=True)
    resumed = tmp_path / "resumed"
    launch([*GPU_ARGS, "--output_dir", str(resumed), "--stop_after_steps", "3"], processes, fsdp=True)
    checkpoint = resumed / "checkpoints" / "checkpoint-3"
    # Really FSDP: accelerate wrote its FSDP model state, which a DDP or single-process run never does.
    assert any(p.name.startswith("pytorch_model_fsdp") for p in checkpoint.iterdir()), sorted(checkpoint.iterdir())
    resume = ["--resume_from_checkpoint", "latest", "--allow_unsafe_pickle"]  # FSDP state: DCP unpickles in full
    launch([*GPU_ARGS, "--output_dir", str(resumed), *resume], processes, fsdp=True)
    for run_dir in ("reference", "fsdp", "resumed"):
        assert json.loads((tmp_path / run_dir / "logs" / "config.json").read_text())["num_processes"] == processes

    reference, fsdp, again = logged(tmp_path / "reference"), logged(tmp_path / "fsdp"), logged(resumed)
    assert sorted(reference) == sorted(fsdp) == sorted(again) == list(range(1, 7))
    for step in range(1, 7):
        # Same data, masks and updates; only the gradient reduction differs (reduce-scatter vs all-reduce).
        assert abs(fsdp[step] - reference[step]) < 1e-3 * max(1.0, abs(reference[step])), (step, fsdp, reference)
        assert abs(again[step] - fsdp[step]) < 1e-5, (step, again, fsdp)  # exact resume

    final = tmp_path / "fsdp" / "final"
    check = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['modeling_mdm_prime'] = None\n"
         "from transformers import AutoModel, AutoTokenizer\n"
         f"m = AutoModel.from_pretrained({str(final)!r}, trust_remote_code=True)\n"
         f"t = AutoTokenizer.from_pretrained({str(final)!r}, trust_remote_code=True)\n"
         "out = m.generate(**t(['ROMEO:'], return_tensors='pt'), max_new_tokens=4, seed=0)\n"
         "print(type(m).__name__, out.shape[1] == len(t('ROMEO:')['input_ids']) + 4)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert check.returncode == 0, check.stderr[-3000:]
    assert check.stdout.split() == ["MDMPrimeForMaskedDiffusion", "True"]
