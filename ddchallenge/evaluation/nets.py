"""The reference network of the challenge: ConvNet-3 (width 128, instance norm,
ReLU, average pooling), layer for layer as the official script builds it, so
that parameter names, shapes and counts match; and `StackedConvNet`, R of
them as one batched model, so that a dataset's rounds train together."""
from __future__ import annotations

import torch
import torch.nn.functional as F
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


class StackedConvNet(nn.Module):
    """R ConvNets of one architecture trained together as one model.

    Every parameter of the R networks is stacked along a new leading axis
    (shape (R, ...)), and a forward pass runs all R on their own batches at
    once: the batches travel side by side in the channel axis, (B, R*C, H, W),
    so each convolution is one grouped convolution (groups=R) and instance
    norm is one GroupNorm over R*width channels; the classifier is R small
    matrix products. Round r only ever meets its own slice of every tensor, so
    its gradient, and the elementwise SGD update on the stack, are those it
    would get alone, up to the summation order inside the grouped kernels.

    This is what `torch.func.vmap(functional_call)` over stacked parameters
    lowers to (vmap's convolution rule is the same grouped convolution), written
    out so that the layout is explicit and torch.compile sees plain ops.
    """

    def __init__(self, nets: list[ConvNet]):
        super().__init__()
        if not nets:
            raise ValueError("StackedConvNet needs at least one network")
        self.rounds = len(nets)
        template = nets[0]
        self._layers: list[tuple[str, dict]] = []
        for i, m in enumerate(template.features):
            if isinstance(m, nn.Conv2d):
                self._layers.append(("conv", {"index": i, "padding": m.padding}))
            elif isinstance(m, nn.GroupNorm):
                self._layers.append(("norm", {"index": i, "groups": m.num_groups, "eps": m.eps}))
            elif isinstance(m, nn.ReLU):
                self._layers.append(("relu", {}))
            elif isinstance(m, nn.AvgPool2d):
                self._layers.append(("pool", {"kernel": m.kernel_size, "stride": m.stride}))
            else:
                raise TypeError(f"StackedConvNet cannot stack a {type(m).__name__} layer")
        shapes = [(n, p.shape) for n, p in template.named_parameters()]
        if any([(n, p.shape) for n, p in net.named_parameters()] != shapes for net in nets[1:]):
            raise ValueError("StackedConvNet stacks networks of one architecture only")
        self.stack = nn.ParameterDict({
            name.replace(".", "_"): nn.Parameter(torch.stack([dict(n.named_parameters())[name].detach() for n in nets]))
            for name, _ in shapes
        })

    def _p(self, name: str) -> torch.Tensor:
        return self.stack[name.replace(".", "_")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (R, B, C, H, W), round r's batch at x[r] -> logits (R, B, classes)."""
        r, b = x.shape[:2]
        if r != self.rounds:
            raise ValueError(f"expected a batch for each of {self.rounds} rounds, got {r}")
        h = x.transpose(0, 1).reshape(b, r * x.shape[2], *x.shape[3:])
        for kind, a in self._layers:
            if kind == "conv":
                w = self._p(f"features.{a['index']}.weight")
                bias = self._p(f"features.{a['index']}.bias")
                h = F.conv2d(h, w.flatten(0, 1), bias.flatten(), padding=a["padding"], groups=r)
            elif kind == "norm":
                w = self._p(f"features.{a['index']}.weight")
                bias = self._p(f"features.{a['index']}.bias")
                h = F.group_norm(h, r * a["groups"], w.flatten(), bias.flatten(), a["eps"])
            elif kind == "relu":
                h = F.relu(h, inplace=True)
            else:
                h = F.avg_pool2d(h, a["kernel"], a["stride"])
        feats = h.reshape(b, r, -1)  # round i's (C, H, W) flattened at [:, i] as it is alone
        w, bias = self._p("classifier.weight"), self._p("classifier.bias")
        # One small matmul per round rather than one baddbmm: the same kernel
        # as the lone network's Linear, so one round stacked alone is that
        # network bit for bit (baddbmm's weight gradient sums in another order).
        return torch.stack([F.linear(feats[:, i], w[i], bias[i]) for i in range(r)])

    @torch.no_grad()
    def unstack(self, nets: list[ConvNet]) -> list[ConvNet]:
        """Copy round r's parameters into nets[r] (same architecture) and return them."""
        if len(nets) != self.rounds:
            raise ValueError(f"expected {self.rounds} networks, got {len(nets)}")
        for r, net in enumerate(nets):
            for name, p in net.named_parameters():
                p.copy_(self._p(name)[r])
        return nets
