#!/usr/bin/env bash
# Issue 18's GPU check, for a session lent a GPU machine (../.library/device/README.md). Here, first:
#     . .venv/bin/activate && python scripts/gpu_wheels.py      # the packages the machine's image lacks, into .gpu/
# then one call of the device tool: run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=590)
#
# It runs `pytest -m gpu` (tests/worker/training/test_gpu.py), then the training benchmark in bf16 on the realistic
# shape (qwen2-152k), its LoRA rows and then its QLoRA rows (TRL with Liger's kernels among the peers), each a run of
# its own so that one cut short by the budget leaves the other's table; all within BUDGET seconds (default 570: the
# tool stops a command at 600). The logs go to $OUT, which comes back with the reply.
# A second call for what the first did not finish: `BUDGET=<seconds the session has left, less a minute> bash
# scripts/gpu_check.sh bench` (the benchmark alone), or `... bench-qlora` (its QLoRA rows alone).
set -uo pipefail
started=$SECONDS
budget=${BUDGET:-570}
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out" /tmp/site /tmp/bench
# Nothing outside the machine can be reached: a Hub request would wait for its timeouts instead of failing.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
stage=${1:-all}

# The carried wheels into /tmp/site, and any requirement of theirs that what is there does not meet.
"$python" scripts/gpu_wheels.py --unpack /tmp/site 2>&1 | tee "$out/environment.txt"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
  "$python" -c "
import torch, transformers, peft, bitsandbytes, trl
cuda = torch.cuda.is_available()
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device',
      torch.cuda.get_device_name(0) if cuda else 'none', 'bf16', cuda and torch.cuda.is_bf16_supported())
print('transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__,
      'trl', trl.__version__)
try:
    import liger_kernel.transformers, importlib.metadata
    print('liger-kernel', importlib.metadata.version('liger-kernel'))
except Exception as exc:
    print('liger-kernel does not import:', exc)
"
} 2>&1 | tee -a "$out/environment.txt"

if [ "$stage" = all ]; then
  timeout 150 "$python" -m pytest -m gpu -p no:cacheprovider -q tests/worker/training/test_gpu.py 2>&1 \
    | tee "$out/pytest-gpu.log"
  echo "pytest -m gpu: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s" | tee -a "$out/pytest-gpu.log"
fi

# BENCH_ARGS: another benchmark run (a rehearsal on a CPU: BENCH_ARGS="--quick --shapes qwen2-152k").
bench() {  # bench NAME ROWS
  local left=$((budget - (SECONDS - started)))
  if ((left < 60)); then
    echo "bench.train $1: not run, ${left} s of the budget left" | tee "$out/bench-$1.log"
    return
  fi
  timeout "$left" "$python" -m bench.train --row-timeout 150 --dir /tmp/bench \
    ${BENCH_ARGS:---shapes qwen2-152k --precision bf16 --rows $2} 2>&1 | tee "$out/bench-$1.log"
  echo "bench.train $1: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s (budget $budget s)" | tee -a "$out/bench-$1.log"
}
if [ "$stage" != bench-qlora ]; then
  bench lora hf-dynamic,hf-grouped,trl,trl-padding-free,trl-liger,tuneforge
fi
if [ -z "${BENCH_ARGS:-}" ]; then
  bench qlora hf-dynamic-qlora,hf-grouped-qlora,trl-qlora,trl-padding-free-qlora,trl-liger-qlora,tuneforge-qlora
fi
