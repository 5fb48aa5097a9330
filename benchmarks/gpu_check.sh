#!/usr/bin/env bash
# Everything that needs a GPU, in one call of at most ~6 minutes: the CUDA tests, the training-step
# benchmark (dense / low-rank / GBLR, fp32 and bf16, small ViT and ViT-384) and Fashion-MNIST small-ViT
# runs of GBLR and low-rank at 0.3 (wall-time ratio). Runs from source, with no installation.
#
#   bash benchmarks/gpu_check.sh --pack   # here, once: Fashion-MNIST into .gpu_data/ (ignored by git)
#   bash benchmarks/gpu_check.sh          # on the GPU machine, with .gpu_data carried along
#
# Results: benchmarks/results/train_step_cuda.{json,md}, fmnist_vit_cuda.{json,md} and the test summary
# in benchmarks/results/gpu_tests.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD/src
if [ "${1:-}" = "--pack" ]; then
    PY=${PYTHON:-.venv/bin/python}
    exec "$PY" - <<'PYTHON'
from pathlib import Path
import numpy as np
from gblr.data import load_fashion_mnist
out = Path(".gpu_data")
out.mkdir(exist_ok=True)
for split in ("train", "test"):
    images, labels = load_fashion_mnist(split)
    np.savez_compressed(out / f"fashion_mnist_{split}.npz", images=images.numpy(), labels=labels.numpy())
print(f"packed Fashion-MNIST into {out}/ ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.0f} MB)")
PYTHON
fi
export GBLR_DATA=${GBLR_DATA:-$PWD/.gpu_data}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
status=0
echo "== CUDA tests"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_train_step.py tests/test_compact.py -k cuda 2>&1 \
    | tee benchmarks/results/gpu_tests.txt | tail -5 || status=1
echo "== training step"
timeout 150 "$PY" benchmarks/train_step.py --device cuda --models small vit-384 --precisions fp32 bf16 --repeats 10 || status=1
echo "== Fashion-MNIST small ViT, GBLR vs low-rank at 0.3 (5 epochs each)"
timeout 240 "$PY" benchmarks/fmnist_vit.py --configs configs/fmnist-vit-small-gblr-0.3.toml \
    configs/fmnist-vit-small-lowrank-0.3.toml --overrides 'train.device="cuda"' --runs runs/gpu-fmnist-vit \
    --name fmnist_vit_cuda || status=1
exit $status
