#!/usr/bin/env bash
# The GPU check in one command, for a machine with CUDA (and torch, lightning, pytest, pytest-timeout installed):
#   bash scripts/gpu_check.sh [OUT_DIR]
# 1. tests/test_cuda.py: every schedule with CUDA stage compute (staged and strict transports), the asynchronous
#    schedules, bf16, a GPU Trainer, replicated stages, the recorded timeline where packing overlaps compute, and,
#    with two GPUs or more, NCCL itself (skipped below two);
# 2. the overhead benchmarks on that machine's CPU cores (quieter than most): host overhead per action against
#    torch.distributed.pipelining, the Trainer against the bare engine on the tiny GPT and its one-device reference.
# Each part has its own time limit (under 9 minutes in all); logs and JSON go to OUT_DIR (default gpu_check_out/).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=passive
python=${PYTHON:-python3}
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found"
$python -c "import sys, torch, lightning; print(sys.version.split()[0], torch.__version__, torch.version.cuda, \
lightning.__version__, torch.cuda.device_count(), 'GPU(s)')"
timeout 200 $python -m pytest tests/test_cuda.py -v -s -p no:cacheprovider 2>&1 | tee "$out/gpu_check.txt" \
    | grep -E "PASSED|FAILED|SKIPPED| passed| failed|Error"
timeout 130 $python -m benchmarks.host_overhead --rounds 2 --json "$out/host_overhead.json" 2>&1 | tail -16
for reference in "" "--one-device"; do
    timeout 110 $python -m benchmarks.lightning_overhead --width 32 --layers 2 --block-size 32 --repeats 2 \
        --steps 200 --warmup 20 $reference --json "$out/lightning_overhead${reference:+_one_device}.json" 2>&1 \
        | grep -E "best|median|runs per side|run\(s\) per side"
done
