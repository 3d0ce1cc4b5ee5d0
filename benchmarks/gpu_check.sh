#!/usr/bin/env bash
# The index's GPU path end to end in a few minutes (benchmarks/gpu_check.py says what it checks):
#   benchmarks/gpu_check.sh                         # 500,000 vectors, 2 shards
#   benchmarks/gpu_check.sh --n 2000000 --shards 4  # arguments go to python -m benchmarks.gpu_check
# Needs FAISS's GPU build: `make install FAISS_EXTRA=gpu` (or pip install ".[models,gpu]").
# Exit status: 0 every check passed; 1 a check failed; 2 this machine has no usable GPU (said
# at once, nothing started); 124 it ran past GPU_CHECK_TIMEOUT_S (default 900 s).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1

no_gpu() { echo "gpu_check: FAIL: $*" >&2; exit 2; }
command -v nvidia-smi >/dev/null || no_gpu "no nvidia-smi on PATH: this machine has no NVIDIA driver"
gpus="$(timeout 30 nvidia-smi -L 2>&1)" || no_gpu "nvidia-smi -L failed or hung (30 s): ${gpus}"
grep -q '^GPU ' <<<"$gpus" || no_gpu "nvidia-smi lists no GPU: ${gpus}"
echo "$gpus"
# FAISS's GPU build, and a GPU it can see; a broken CUDA setup fails here, bounded, not in the middle.
timeout 120 "$PYTHON" - <<'PY' || no_gpu "FAISS cannot use a GPU here (see above)"
import sys
import faiss
if not hasattr(faiss, "StandardGpuResources"):
    sys.exit(f"FAISS {faiss.__version__} has no GPU support: install the `gpu` extra in place of faiss-cpu "
             "(make install FAISS_EXTRA=gpu, or pip install '.[models,gpu]')")
n = faiss.get_num_gpus()
if n < 1:
    sys.exit("FAISS has GPU support but sees no GPU (CUDA_VISIBLE_DEVICES? driver too old for CUDA 12?)")
print(f"FAISS {faiss.__version__}: {n} GPU(s)")
PY
exec timeout --kill-after=30 "${GPU_CHECK_TIMEOUT_S:-900}" "$PYTHON" -m benchmarks.gpu_check "$@"
