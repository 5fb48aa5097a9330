"""Offline data sets: Fashion-MNIST, the 5k MNIST subset, scikit-learn digits, Shakespeare text, MR polarity."""

from .cache import DataUnavailable, data_home
from .text import CharTokenizer, load_movie_review_polarity, load_shakespeare, shakespeare_sentences
from .vision import load_digits, load_fashion_mnist, load_mnist5k, train_val_split

__all__ = [
    "DataUnavailable", "data_home", "load_fashion_mnist", "load_mnist5k", "load_digits", "train_val_split",
    "load_shakespeare", "shakespeare_sentences", "load_movie_review_polarity", "CharTokenizer",
]
