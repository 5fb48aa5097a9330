"""Reference models written for this project. They use plain ``nn.Linear`` layers; which of them become
structured is decided by conversion (:func:`paper_filter`), never inside the models."""

from .gpt import GPT
from .mixer import MLPMixer
from .vit import ViT

__all__ = ["ViT", "MLPMixer", "GPT", "paper_filter", "PAPER_LAYERS"]

#: Leaf names of the layers the paper structures: attention q, k, v and the MLPs (token- and channel-
#: MLPs in Mixer). Attention output projections, embeddings, heads and norms stay dense.
PAPER_LAYERS = ("q", "k", "v", "fc1", "fc2")


def paper_filter(module, name: str) -> bool:
    return name.rsplit(".", 1)[-1] in PAPER_LAYERS
