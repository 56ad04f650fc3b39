"""The reference network of the challenge: ConvNet-3 (width 128, instance norm,
ReLU, average pooling), layer for layer as the official script builds it, so
that parameter names, shapes and counts match."""
from __future__ import annotations

from torch import nn

from ddchallenge.protocol import DatasetSpec


class ConvNet(nn.Module):
    def __init__(self, channels: int, classes: int, size: int, width: int = 128, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        # The official net treats 28x28 input as 32x32: its first conv pads
        # 1-channel images by 3 instead of 1, which adds 4 pixels.
        feat = 32 if size == 28 else size
        in_ch = channels
        for d in range(depth):
            pad = 3 if channels == 1 and d == 0 else 1
            layers += [
                nn.Conv2d(in_ch, width, kernel_size=3, padding=pad),
                # "instancenorm" in the official code is GroupNorm with one
                # group per channel and affine parameters.
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            in_ch = width
            feat //= 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * feat * feat, classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def reference_convnet(spec: DatasetSpec, width: int = 128, depth: int = 3) -> ConvNet:
    return ConvNet(spec.channels, spec.classes, spec.size, width=width, depth=depth)
