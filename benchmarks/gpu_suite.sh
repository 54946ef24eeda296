#!/usr/bin/env bash
# One GPU check (issue 15). From the repository root, on a CUDA machine:
#
#   bash .ci/install.sh && bash benchmarks/gpu_suite.sh              # every step, about 20 minutes
#   bash benchmarks/gpu_suite.sh adaptation                          # only the named steps (any of the five)
#
# 1. tests: the tests that take a device, on CUDA (tests/test_precision.py, tests/test_fsdp.py) and the objective
#    and model tests;
# 2. scale: benchmarks/scale.py in bf16 at the papers' configuration (eager and torch.compile, memory with and
#    without gradient checkpointing, generation) -> benchmarks/results/scale_cuda.{json,md}, the README's Scale table;
# 3. pretrain: a short bf16 examples/pretrain.py run (DDP over all GPUs when there is more than one);
# 4. fsdp: FSDP (the shipped examples/accelerate_configs/fsdp.yaml, FSDP2): loss parity with DDP / one process,
#    checkpoint and exact resume, final/ loadable (tests/test_fsdp.py with MDM_PRIME_FSDP_DEVICE=cuda);
# 5. adaptation: SmolLM2-135M adapted (benchmarks/adaptation.py, bf16, ℓ = 1 and ℓ = 2, 1,500 steps of 32 × 128
#    tokens each) -> benchmarks/results/adaptation_cuda.{json,md,png}. It needs the SmolLM2 GGUF in the cache
#    (~/.cache/modeling_mdm_prime/smollm2/); without it the step is reported as skipped.
#
# A machine without PyPI (the lent ones: their python3 has torch and transformers but not datasets, evaluate or
# gguf, and a call carries at most 64 MiB) gets both through benchmarks/gpu_stage.py: `pack` here writes
# .gpu_stage/part0, part1, ...; carry one part per call, back to back; this script then installs the wheels into
# .gpu_stage/site, puts the repository on PYTHONPATH and joins the GGUF into the cache (sha256 checked). Without
# .venv it uses python3 (or $PYTHON).
#
# Every step has its own time limit and log in benchmarks/results/gpu_suite/; a failed step is reported and the
# others still run; the exit status is non-zero if any step failed. summary.json lists steps, status, seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
LOGS=benchmarks/results/gpu_suite
ALL_STEPS=(tests scale pretrain fsdp adaptation)
STEPS=("$@")
[ "${#STEPS[@]}" -gt 0 ] || STEPS=("${ALL_STEPS[@]}")
for step in "${STEPS[@]}"; do
  case " ${ALL_STEPS[*]} " in
    *" $step "*) ;;
    *) echo "gpu_suite.sh: unknown step '$step'; expected some of: ${ALL_STEPS[*]}" >&2; exit 2 ;;
  esac
done
wanted() { case " ${STEPS[*]} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
mkdir -p "$LOGS"

# Staged wheels and GGUF pieces (benchmarks/gpu_stage.py) for a machine that can reach no package index.
if [ -d .gpu_stage/part0/wheels ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --upgrade \
    --target .gpu_stage/site .gpu_stage/part0/wheels/*.whl
  export PYTHONPATH="$PWD/.gpu_stage/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import modeling_mdm_prime" 2>/dev/null; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # not installed: run from the checkout
fi

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_suite.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False); nothing run." >&2
  exit 2
fi
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| GPUs:', torch.cuda.device_count(), '| torch', torch.__version__)" | tee "$LOGS/device.txt"

FAILED=()
SUMMARY=()
# run_step NAME SECONDS COMMAND...: run with a time limit (SIGINT, then SIGKILL 20 s later), log to $LOGS/NAME.log.
run_step() {
  local name=$1 limit=$2 start status
  shift 2
  echo "== $name (limit ${limit} s): $*"
  start=$SECONDS
  if timeout --signal=INT --kill-after=20 "$limit" "$@" >"$LOGS/$name.log" 2>&1; then
    status=ok
  else
    status="failed (exit $?; 124 = time limit)"
    FAILED+=("$name")
    tail -n 40 "$LOGS/$name.log" || true
  fi
  echo "   $status after $((SECONDS - start)) s"
  SUMMARY+=("{\"step\": \"$name\", \"status\": \"$status\", \"seconds\": $((SECONDS - start))}")
}

# 1. Tests (device-aware ones run on CUDA; the FSDP test has its own step below).
wanted tests && run_step tests 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_precision.py tests/test_objectives.py \
  tests/test_codec.py tests/test_modeling.py

# 2. Scale benchmark, bf16 autocast, papers' configuration, batch 8 x 1024 tokens.
wanted scale && run_step scale 300 "$PY" benchmarks/scale.py --configs paper --compile_configs paper --dtype bf16 --batch_size 8 \
  --rounds 3 --steps 3 --gen_steps 128

# 3. Short bf16 pretraining run on the bundled corpus (DDP over all GPUs if there are several).
PRETRAIN_OUT=$(mktemp -d)
LAUNCH=("$PY" -m accelerate.commands.launch --num_machines 1 --mixed_precision bf16 --dynamo_backend no)
if [ "$NGPU" -gt 1 ]; then
  LAUNCH+=(--multi_gpu --num_processes "$NGPU")
else
  LAUNCH+=(--num_processes 1)
fi
wanted pretrain && run_step pretrain 90 "${LAUNCH[@]}" examples/pretrain.py --mixed_precision bf16 --max_steps 200 --eval_every 100 \
  --checkpoint_every 100 --num_samples 1 --report_to jsonl --output_dir "$PRETRAIN_OUT/run"
cp "$PRETRAIN_OUT/run/logs/metrics.jsonl" "$LOGS/pretrain_metrics.jsonl" 2>/dev/null || true

# 4. FSDP: parity, exact resume, loadable final/ (skips only if the launch cannot start at all).
wanted fsdp && run_step fsdp 90 env MDM_PRIME_FSDP_DEVICE=cuda "$PY" -m pytest -q -x -p no:cacheprovider -rs tests/test_fsdp.py
rm -rf "$PRETRAIN_OUT"

# 5. Adaptation of SmolLM2-135M in bf16 (the GGUF must be in the cache: the machine may have no PyPI).
cached() { "$PY" -c "from modeling_mdm_prime.tools.adaptation import smollm2_cached; raise SystemExit(not smollm2_cached())"; }
if wanted adaptation; then
  if ! cached && [ -d .gpu_stage ]; then
    run_step stage 60 "$PY" benchmarks/gpu_stage.py unpack  # the carried pieces, joined and checked
  fi
  if cached; then
    run_step adaptation 540 "$PY" benchmarks/adaptation.py --variants l1_flip,l2_flip --max_steps 1500 --batch_size 32 \
      --eval_every 300 --eval_blocks 32 --mixed_precision bf16 --tag adaptation_cuda
  else
    echo "== adaptation: skipped (no SmolLM2 GGUF in ~/.cache/modeling_mdm_prime/smollm2/; see benchmarks/gpu_stage.py)"
    SUMMARY+=("{\"step\": \"adaptation\", \"status\": \"skipped: no SmolLM2 GGUF in the cache\", \"seconds\": 0}")
  fi
fi

{
  echo "["
  for i in "${!SUMMARY[@]}"; do
    sep=","
    [ "$i" -eq $((${#SUMMARY[@]} - 1)) ] && sep=""
    echo "  ${SUMMARY[$i]}$sep"
  done
  echo "]"
} >"$LOGS/summary.json"
cat "$LOGS/summary.json"
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "gpu_suite.sh: failed steps: ${FAILED[*]} (logs in $LOGS/)" >&2
  exit 1
fi
echo "gpu_suite.sh: all steps passed; results in benchmarks/results/scale_cuda.{json,md} and $LOGS/"
