#!/usr/bin/env bash
# The first thing to run on a GPU machine: installs what it needs (make venv), writes a synthetic
# ImageNet-layout JPEG tree and times every method's ImageNet model through the real loop (DALI
# mixed decoding, bf16, channels_last, batch 256 per GPU or the largest that fits), one JSON line
# per run, then a table. All GPUs by default (--gpus N: torchrun --nproc_per_node=N); --cpu is
# the dry run CI takes (tiny sizes, same code path). Options: python -m benchmarks.gpu_check -h.
set -euo pipefail
cd "$(dirname "$0")/.."

install=1
cpu=0
for arg in "$@"; do
    case "$arg" in
        --no-install) install=0 ;;
        --cpu) cpu=1 ;;
    esac
done
if [ "$cpu" = 0 ] && ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check.sh: nvidia-smi finds no GPU (run with --cpu for the dry run)" >&2
    exit 2
fi
if [ "$install" = 1 ]; then
    make venv
fi
if [ "$cpu" = 1 ]; then
    export DS_ACCELERATOR=cpu
else
    export DS_ACCELERATOR=cuda
fi
exec .venv/bin/python -m benchmarks.gpu_check "$@"
