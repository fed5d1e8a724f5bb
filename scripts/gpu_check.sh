#!/usr/bin/env bash
# Issue 18's GPU check, for a session lent a GPU machine (../.library/device/README.md). Here, first:
#     . .venv/bin/activate && python scripts/gpu_wheels.py      # the packages the machine's image lacks, into .gpu/
# then one call of the device tool: run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=590)
#
# It runs `pytest -m gpu` (tests/worker/training/test_gpu.py) and then the training benchmark in bf16 on the realistic
# shape (qwen2-152k: LoRA and QLoRA rows, TRL with Liger's kernels among the peers), within BUDGET seconds in all
# (default 570: the tool stops a command at 600), and writes their logs to $OUT (they come back with the reply).
# `bash scripts/gpu_check.sh bench` runs the benchmark alone (a second call when the first ran out of time).
set -uo pipefail
started=$SECONDS
budget=${BUDGET:-570}
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out" /tmp/site
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}

# Wheels are zip files: unpacked as pip --target would (no entry points needed), so no pip or index is needed there.
"$python" - <<'EOF' || exit 1
import pathlib, sys, zipfile
wheels = sorted(pathlib.Path(".gpu/wheels").glob("*.whl"))
if not wheels:
    sys.exit("no wheels in .gpu/wheels: run `python scripts/gpu_wheels.py` here and carry .gpu")
for wheel in wheels:
    zipfile.ZipFile(wheel).extractall("/tmp/site")
print(f"unpacked {len(wheels)} wheels into /tmp/site")
EOF

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$python" -c "
import torch, transformers, peft, bitsandbytes, trl
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0),
      'bf16', torch.cuda.is_bf16_supported())
print('transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__,
      'trl', trl.__version__)
try:
    import liger_kernel, importlib.metadata
    print('liger-kernel', importlib.metadata.version('liger-kernel'))
except ImportError as exc:
    print('liger-kernel does not import:', exc)
"
} 2>&1 | tee "$out/environment.txt"

if [ "${1:-all}" != "bench" ]; then
  timeout 200 "$python" -m pytest -m gpu -p no:cacheprovider -q tests/worker/training/test_gpu.py 2>&1 \
    | tee "$out/pytest-gpu.log"
  echo "pytest -m gpu: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s" | tee -a "$out/pytest-gpu.log"
fi

left=$((budget - (SECONDS - started)))
mkdir -p /tmp/bench
# BENCH_ARGS: another run of the benchmark (a rehearsal on a CPU: BENCH_ARGS="--quick --shapes qwen2-152k").
timeout "$left" "$python" -m bench.train ${BENCH_ARGS:---shapes qwen2-152k --precision bf16} --row-timeout 150 \
  --dir /tmp/bench 2>&1 \
  | tee "$out/bench-train-bf16.log"
echo "bench.train: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s (budget $budget s)" | tee -a "$out/bench-train-bf16.log"
