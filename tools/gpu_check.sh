#!/usr/bin/env bash
# The checks to run when a session is lent a CUDA machine (one GPU is enough: test ranks
# that share it are separate NCCL hosts). Versions, the CUDA/NCCL tests, then
# bench_overhead on the GPU. Logs go to $OUT (default /tmp/gpu_check). ~9 minutes on an H100, 13 at worst.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false
PY=${PY:-python3}
{
  $PY -c "import sys, torch; print(sys.version.split()[0], torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), torch.cuda.get_device_name())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  df -h /dev/shm /tmp | tail -n 2
} 2>&1 | tee "$OUT/env.txt"
timeout 330 $PY -m pytest -q -p no:cacheprovider tests/gemini/test_staging.py tests/gemini/test_snapshot.py \
  tests/gemini/test_store.py tests/gemini/test_cuda.py tests/gemini/test_sigkill_restart.py 2>&1 | tee "$OUT/tests.txt"
for transport in nccl gloo; do
  timeout 200 $PY tools/bench_overhead.py --device cuda --transport $transport --quick --timeout 50 \
    --num-layers 6 --hidden-size 768 --num-attention-heads 12 --seq-length 512 --micro-batch-size 4 \
    --global-batch-size 8 2>&1 | tee "$OUT/bench_overhead_cuda_$transport.txt"
done
