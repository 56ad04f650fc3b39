"""The cross-architecture evaluation pool of DatasetCondensation (Zhao et
al., `networks.py` and `get_network` in its utils): ConvNet, ConvNet-BN,
ConvNet-4, MLP, LeNet, AlexNet, VGG-11 and ResNet-18, rebuilt layer for layer
for 1x28x28 and 3x32x32 images (the shapes that code supports), so that
every convolution, norm, pooling and linear layer has the reference's shape
and the networks the reference's parameter counts (tests/test_pool.py).

Written from the definitions, not copied. What the reference does and we
keep: 28x28 input is padded up to 32x32 by the first convolution of the
ConvNets, AlexNet and VGG (LeNet pads by 2, the MLP reads 784 inputs); its
"instancenorm" is GroupNorm with one group per channel and affine
parameters; VGG-11 and ResNet-18 use it, ConvNet-BN uses BatchNorm.

64x64 (Tiny-ImageNet) is not a shape the reference supports (its linear
layers are sized for 32x32). Here every layer is kept and only the
classifier's input is sized to what the features flatten to; results at
64x64 are ours, not the reference's (docs/evaluator.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddchallenge.errors import UsageError
from ddchallenge.evaluation.nets import ConvNet
from ddchallenge.extras import ARCHITECTURES
from ddchallenge.protocol import DatasetSpec


def _flat(features: nn.Module, channels: int, size: int) -> int:
    """How many numbers `features` makes of one image (run once on zeros)."""
    was = features.training
    with torch.no_grad():
        n = features.eval()(torch.zeros(1, channels, size, size)).numel()
    features.train(was)
    return n


def _instance_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(ch, ch, affine=True)


class ConvNetBN(ConvNet):
    """ConvNet with BatchNorm in place of instance norm (the reference's
    `ConvNetBN`: width 128, depth 3, ReLU, average pooling)."""

    def __init__(self, channels: int, classes: int, size: int, width: int = 128, depth: int = 3):
        super().__init__(channels, classes, size, width, depth)
        self.features = nn.Sequential(*[nn.BatchNorm2d(width, affine=True) if isinstance(m, nn.GroupNorm) else m
                                        for m in self.features])


class MLP(nn.Module):
    """Three linear layers (hidden 128, ReLU) on the flattened image."""

    def __init__(self, channels: int, classes: int, size: int):
        super().__init__()
        self.fc_1 = nn.Linear(channels * size * size, 128)
        self.fc_2 = nn.Linear(128, 128)
        self.fc_3 = nn.Linear(128, classes)

    def forward(self, x):
        return self.fc_3(F.relu(self.fc_2(F.relu(self.fc_1(x.flatten(1))))))


class LeNet(nn.Module):
    """conv5(6) - maxpool - conv5(16) - maxpool - fc 120 - fc 84 - fc; the
    first convolution pads 1-channel input by 2 (28x28 keeps its size)."""

    def __init__(self, channels: int, classes: int, size: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, kernel_size=5, padding=2 if channels == 1 else 0), nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
        )
        self.fc_1 = nn.Linear(_flat(self.features, channels, size), 120)
        self.fc_2 = nn.Linear(120, 84)
        self.fc_3 = nn.Linear(84, classes)

    def forward(self, x):
        h = self.features(x).flatten(1)
        return self.fc_3(F.relu(self.fc_2(F.relu(self.fc_1(h)))))


class AlexNet(nn.Module):
    """The reference's small AlexNet: conv5(128) - pool - conv5(192) - pool -
    conv3(256) - conv3(192) - conv3(192) - pool - one linear layer; no norm."""

    def __init__(self, channels: int, classes: int, size: int):
        super().__init__()
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(channels, 128, kernel_size=5, padding=4 if channels == 1 else 2), relu(), nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 192, kernel_size=5, padding=2), relu(), nn.MaxPool2d(2, 2),
            nn.Conv2d(192, 256, kernel_size=3, padding=1), relu(),
            nn.Conv2d(256, 192, kernel_size=3, padding=1), relu(),
            nn.Conv2d(192, 192, kernel_size=3, padding=1), relu(), nn.MaxPool2d(2, 2),
        )
        self.fc = nn.Linear(_flat(self.features, channels, size), classes)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """VGG-11 with instance norm after every convolution (the reference's
    default `VGG11`); its first convolution pads 1-channel input by 3."""

    def __init__(self, channels: int, classes: int, size: int):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = channels
        for i, v in enumerate(_VGG11):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=3 if channels == 1 and i == 0 else 1),
                       _instance_norm(v), nn.ReLU(inplace=True)]
            in_ch = v
        # The reference ends its features with a 1x1 average pool of stride 1: the identity, left out.
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(_flat(self.features, channels, size), classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class _Block(nn.Module):
    """ResNet basic block: two 3x3 convolutions (no bias) with instance norm,
    a 1x1 strided projection with instance norm when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _instance_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = _instance_norm(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          _instance_norm(out_ch))

    def forward(self, x):
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(h + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images (3x3 stem, no max pool; stages of 64, 128,
    256, 512 channels, two blocks each, strides 1, 2, 2, 2), instance norm,
    a 4x4 average pool and one linear layer."""

    def __init__(self, channels: int, classes: int, size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = _instance_norm(64)
        stages, in_ch = [], 64
        for out_ch, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(_Block(in_ch, out_ch, stride), _Block(out_ch, out_ch, 1)))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.classifier = nn.Linear(_flat(nn.Sequential(self.conv1, *stages, nn.AvgPool2d(4)), channels, size), classes)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.classifier(F.avg_pool2d(h, 4).flatten(1))


def build(arch: str, spec: DatasetSpec, width: int = 128, depth: int = 3) -> nn.Module:
    """A fresh network of the pool for `spec`'s images (initialised from the
    global torch RNG, as every module is). `width` and `depth` are the
    recipe's ConvNet settings: "convnet" is the challenge's ConvNet with
    them, so that it is the challenge network; ConvNet-BN takes the width
    and depth, ConvNet-4 the width (the reference builds both from its
    default ConvNet setting, which the official recipe equals); the others
    have fixed shapes."""
    c, k, s = spec.channels, spec.classes, spec.size
    if arch == "convnet":
        return ConvNet(c, k, s, width, depth)
    if arch == "convnetbn":
        return ConvNetBN(c, k, s, width, depth)
    if arch == "convnetd4":
        return ConvNet(c, k, s, width, 4)
    makers = {"mlp": MLP, "lenet": LeNet, "alexnet": AlexNet, "vgg11": VGG11, "resnet18": ResNet18}
    if arch not in makers:
        raise UsageError(f"unknown architecture {arch!r}; the pool: {', '.join(ARCHITECTURES)} (or 'pool' for all)")
    return makers[arch](c, k, s)


def parse_archs(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The --arch values as pool names, in the order given, each once;
    'pool' is every architecture. UsageError naming an unknown one."""
    out: list[str] = []
    for name in names:
        name = name.strip().lower()
        found = ARCHITECTURES if name == "pool" else (name,)
        for a in found:
            if a not in ARCHITECTURES:
                raise UsageError(f"--arch: unknown architecture {name!r}; the pool: {', '.join(ARCHITECTURES)}, or "
                                 "'pool' for all of them")
            if a not in out:
                out.append(a)
    return tuple(out)
