"""Training: configuration, the training loop, checkpoints and structure pictures (on top of the core)."""

from .config import RunConfig, load_config
from .trainer import load_trained, train

__all__ = ["RunConfig", "load_config", "train", "load_trained"]
