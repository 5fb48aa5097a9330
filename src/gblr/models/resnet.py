"""A small ResNet for small images: a 3x3 stem, three stages of basic residual blocks (the channels
double and the resolution halves at each stage), global average pooling and a linear head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, plus the input (through a 1x1 convolution when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """``width`` channels in the first stage (2x and 4x in the next two), ``blocks`` residual blocks per stage."""

    def __init__(self, channels: int = 1, classes: int = 10, width: int = 16, blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, in_channels = [], width
        for stage in range(3):
            out_channels = width * 2**stage
            for block in range(blocks):
                stages.append(BasicBlock(in_channels, out_channels, stride=2 if stage and not block else 1))
                in_channels = out_channels
        self.blocks = nn.Sequential(*stages)
        self.head = nn.Linear(in_channels, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 3:  # grey images without a channel axis
            images = images.unsqueeze(1)
        return self.head(self.blocks(self.stem(images)).mean(dim=(2, 3)))
