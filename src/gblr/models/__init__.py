"""Reference models written for this project. They use plain ``nn.Linear`` and ``nn.Conv2d`` layers;
which of them become structured is decided by conversion (:func:`paper_filter`), never inside the models."""

from .gpt import GPT
from .mixer import MLPMixer
from .resnet import ResNet
from .vit import ViT

__all__ = ["ViT", "MLPMixer", "GPT", "ResNet", "paper_filter", "PAPER_LAYERS"]

#: Leaf names of the layers the paper structures: attention q, k, v and the MLPs (token- and channel-
#: MLPs in Mixer), and the 3x3 convolutions of ResNet's residual blocks. Attention output projections,
#: embeddings, the ResNet stem and 1x1 shortcuts, heads and norms stay dense.
PAPER_LAYERS = ("q", "k", "v", "fc1", "fc2", "conv1", "conv2")


def paper_filter(module, name: str) -> bool:
    return name.rsplit(".", 1)[-1] in PAPER_LAYERS
