#!/usr/bin/env bash
# The GPU check in one command, for a machine with CUDA (and torch, lightning, pytest, pytest-timeout installed):
#   bash scripts/gpu_check.sh [OUT_DIR]
# 1. tests/test_cuda.py: every schedule with CUDA stage compute (staged and strict transports), the asynchronous
#    schedules, bf16, a GPU Trainer, replicated stages, the recorded timeline where packing overlaps compute, captured
#    models (Hugging Face, litgpt, ViTs, torchvision and timm where installed) and meta-device builds against one GPU,
#    and, with two GPUs or more, NCCL itself (skipped below two);
# 2. the overhead benchmarks on that machine's CPU cores (quieter than most), as long as the run is young enough to
#    stay inside a 10-minute lease: host overhead per action against torch.distributed.pipelining, the Trainer against
#    the bare engine on the tiny GPT (ONE_DEVICE=1 adds its one-device reference).
# Logs and JSON go to OUT_DIR (default gpu_check_out/).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=passive
python=${PYTHON:-python3}
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found"
$python -c "import sys, torch, lightning; print(sys.version.split()[0], torch.__version__, torch.version.cuda, \
lightning.__version__, torch.cuda.device_count(), 'GPU(s)')"
timeout 420 $python -m pytest tests/test_cuda.py -v -s -p no:cacheprovider 2>&1 | tee "$out/gpu_check.txt" \
    | grep -E "PASSED|FAILED|SKIPPED| passed| failed|Error|differ from one GPU"
echo "tests done after ${SECONDS} s"
if (( SECONDS < 400 )); then
    timeout 130 $python -m benchmarks.host_overhead --rounds 2 --json "$out/host_overhead.json" 2>&1 | tail -16
fi
for reference in "" ${ONE_DEVICE:+--one-device}; do
    (( SECONDS < 470 )) || { echo "the Trainer overhead benchmark${reference:+ (one device)} left out: ${SECONDS} s"; break; }
    timeout 110 $python -m benchmarks.lightning_overhead --width 32 --layers 2 --block-size 32 --repeats 2 \
        --steps 200 --warmup 20 $reference --json "$out/lightning_overhead${reference:+_one_device}.json" 2>&1 \
        | grep -E "best|median|runs per side|run\(s\) per side"
done
