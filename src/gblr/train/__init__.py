"""Training: configuration, the training loop, checkpoints and structure pictures (on top of the core)."""

from .config import RunConfig, load_config
from .trainer import TrainingDiverged, load_trained, train

__all__ = ["RunConfig", "TrainingDiverged", "load_config", "train", "load_trained"]
