"""The cross-architecture pool (ddchallenge.evaluation.pool) against the
DatasetCondensation definitions (networks.py, get_network in utils.py).

Every expected parameter count below is derived by hand from the reference
layer list, one term per layer: a convolution is in*out*k*k weights plus out
biases (ResNet's convolutions have no bias), an instance norm (GroupNorm,
one group per channel, affine) or a BatchNorm is 2*channels, a linear layer
is in*out + out. The spatial sizes that feed the classifiers follow the
reference: 28x28 input is padded to 32x32 by the ConvNets, AlexNet and VGG
(first convolution padding 3, 4 and 3 for one channel), LeNet pads 28x28 by
2 and reads 16*5*5, the MLP reads 784 (1x28x28) or 3072 (3x32x32) inputs.
"""
import pytest
import torch

from ddchallenge.errors import UsageError
from ddchallenge.evaluation.nets import reference_convnet
from ddchallenge.evaluation.pool import build, parse_archs
from ddchallenge.extras import ARCHITECTURES
from ddchallenge.protocol import get_dataset


def conv(i, o, k, bias=True):
    return i * o * k * k + (o if bias else 0)


def linear(i, o):
    return i * o + o


def norm(c):
    return 2 * c


def convnet(c, k, feat, depth=3, width=128):
    # [conv3x3, norm, relu, avgpool] x depth, then linear(width * feat * feat -> k)
    return conv(c, width, 3) + norm(width) + (depth - 1) * (conv(width, width, 3) + norm(width)) \
        + linear(width * feat * feat, k)


def mlp(inputs, k):
    return linear(inputs, 128) + linear(128, 128) + linear(128, k)


def lenet(c, k):
    return conv(c, 6, 5) + conv(6, 16, 5) + linear(16 * 5 * 5, 120) + linear(120, 84) + linear(84, k)


def alexnet(c, k):
    return conv(c, 128, 5) + conv(128, 192, 5) + conv(192, 256, 3) + conv(256, 192, 3) + conv(192, 192, 3) \
        + linear(192 * 4 * 4, k)


def vgg11(c, k):
    chans = [c, 64, 128, 256, 256, 512, 512, 512, 512]  # cfg VGG11 without its 'M' pools
    return sum(conv(i, o, 3) + norm(o) for i, o in zip(chans, chans[1:])) + linear(512, k)


def resnet18(c, k):
    def block(i, o):  # two 3x3 convs without bias and two norms; a 1x1 projection + norm when the shape changes
        return conv(i, o, 3, False) + norm(o) + conv(o, o, 3, False) + norm(o) \
            + (conv(i, o, 1, False) + norm(o) if i != o else 0)
    stages = [(64, 64), (64, 128), (128, 256), (256, 512)]
    return conv(c, 64, 3, False) + norm(64) + sum(block(i, o) + block(o, o) for i, o in stages) + linear(512, k)


EXPECTED = {
    # (channels, classes) -> counts; 1x28x28 features are 4x4 after 3 pools of 32, 2x2 after 4
    "mnist": {"convnet": convnet(1, 10, 4), "convnetbn": convnet(1, 10, 4), "convnetd4": convnet(1, 10, 2, depth=4),
              "mlp": mlp(784, 10), "lenet": lenet(1, 10), "alexnet": alexnet(1, 10), "vgg11": vgg11(1, 10),
              "resnet18": resnet18(1, 10)},
    "cifar100": {"convnet": convnet(3, 100, 4), "convnetbn": convnet(3, 100, 4),
                 "convnetd4": convnet(3, 100, 2, depth=4), "mlp": mlp(3072, 100), "lenet": lenet(3, 100),
                 "alexnet": alexnet(3, 100), "vgg11": vgg11(3, 100), "resnet18": resnet18(3, 100)},
}


def count(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("dataset", sorted(EXPECTED))
def test_parameter_counts_match_the_reference_definitions(dataset):
    spec = get_dataset(dataset)
    assert set(EXPECTED[dataset]) == set(ARCHITECTURES)
    with torch.device("meta"):  # shapes only: no weights drawn, no memory
        got = {a: count(build(a, spec)) for a in ARCHITECTURES}
    assert got == EXPECTED[dataset]
    # two numbers worked out in full, as a check on the formulas themselves
    assert EXPECTED["mnist"]["mlp"] == 118_282 and EXPECTED["mnist"]["convnet"] == 317_706


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "tinyimagenet"])
def test_every_architecture_runs_a_forward_pass_on_each_image_shape(dataset):
    spec = get_dataset(dataset)
    with torch.device("meta"):  # every layer's shape checked by torch, nothing computed
        x = torch.zeros(2, *spec.image_shape)
        for arch in ARCHITECTURES:
            assert build(arch, spec)(x).shape == (2, spec.classes), arch


def test_convnet_is_the_challenge_network_and_the_mlp_computes_its_layers_in_order():
    spec = get_dataset("mnist5k")
    torch.manual_seed(3)
    ours = build("convnet", spec, width=16, depth=2)
    torch.manual_seed(3)
    ref = reference_convnet(spec, 16, 2)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    # fixed weights 0.01, zero biases, an all-ones image: 784*0.01 = 7.84 per hidden unit, then 128*0.01*7.84,
    # then 128*0.01 times that
    net = build("mlp", spec)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.fill_(0.0 if name.endswith("bias") else 0.01)
        out = net(torch.ones(1, 1, 28, 28))
    assert torch.allclose(out, torch.full((1, 10), 128 * 0.01 * 128 * 0.01 * 7.84))


def test_arch_names_parse_and_unknown_ones_are_refused():
    assert parse_archs(["VGG11", "pool"])[:2] == ("vgg11", "convnet") and len(parse_archs(["pool"])) == 8
    assert parse_archs(["mlp", "mlp"]) == ("mlp",)
    with pytest.raises(UsageError, match="unknown architecture 'vit'; the pool: convnet, convnetbn"):
        parse_archs(["vit"])


# ---------------------------------------------------------------- layer for layer: kinds, norms, pools, strides

def _token(m) -> str | None:
    """One leaf module as text: what a parameter count cannot tell apart (a
    GroupNorm from a BatchNorm, average from max pooling, strides, padding)."""
    from torch import nn

    if isinstance(m, nn.Conv2d):
        return f"conv{m.in_channels}-{m.out_channels} k{m.kernel_size[0]} s{m.stride[0]} p{m.padding[0]}" \
            + ("" if m.bias is not None else " nobias")
    if isinstance(m, nn.GroupNorm):
        return f"instancenorm{m.num_channels}" if m.num_groups == m.num_channels and m.affine else f"groupnorm{m}"
    if isinstance(m, nn.BatchNorm2d):
        return f"batchnorm{m.num_features}"
    if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):
        return f"{'avg' if isinstance(m, nn.AvgPool2d) else 'max'}pool{m.kernel_size}"
    if isinstance(m, nn.Linear):
        return f"fc{m.in_features}-{m.out_features}"
    if isinstance(m, nn.ReLU):
        return "relu"
    return None if not list(m.children()) and not list(m.parameters(recurse=False)) else f"?{type(m).__name__}"


def layers(net) -> list[str]:
    leaves = [m for m in net.modules() if not list(m.children())]
    return [t for t in map(_token, leaves) if t is not None]


def ref_convnet(c, k, depth=3, norm="instancenorm"):
    # networks.py ConvNet: [conv3x3 (padding 3 for the first conv of 1-channel input), norm, relu, avgpool] x depth
    out = []
    for d in range(depth):
        out += [f"conv{c if d == 0 else 128}-128 k3 s1 p{3 if c == 1 and d == 0 else 1}", f"{norm}128", "relu",
                "avgpool2"]
    return out + [f"fc{128 * (4 if depth == 3 else 2) ** 2}-{k}"]


def ref_resnet18(c, k):
    out = [f"conv{c}-64 k3 s1 p1 nobias", "instancenorm64"]
    for i, o, s in ((64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)):
        for bi, bo, bs in ((i, o, s), (o, o, 1)):  # BasicBlock: conv1 (stride), bn1, conv2, bn2, [1x1 projection, bn]
            out += [f"conv{bi}-{bo} k3 s{bs} p1 nobias", f"instancenorm{bo}", f"conv{bo}-{bo} k3 s1 p1 nobias",
                    f"instancenorm{bo}"]
            if bs != 1 or bi != bo:
                out += [f"conv{bi}-{bo} k1 s{bs} p0 nobias", f"instancenorm{bo}"]
    return out + [f"fc512-{k}"]


VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")  # networks.py's cfg_vgg['VGG11']


def ref_vgg11(c, k):
    out, i = [], c
    for n, v in enumerate(VGG11_CFG):
        if v == "M":
            out.append("maxpool2")
        else:
            out += [f"conv{i}-{v} k3 s1 p{3 if c == 1 and n == 0 else 1}", f"instancenorm{v}", "relu"]
            i = v
    return out + [f"fc512-{k}"]  # the reference's closing AvgPool2d(1, 1) is the identity: not built


def ref_layers(c, k, pixels):
    return {
        "convnet": ref_convnet(c, k), "convnetbn": ref_convnet(c, k, norm="batchnorm"),
        "convnetd4": ref_convnet(c, k, depth=4),
        "mlp": [f"fc{pixels}-128", "fc128-128", f"fc128-{k}"],
        "lenet": [f"conv{c}-6 k5 s1 p{2 if c == 1 else 0}", "relu", "maxpool2", "conv6-16 k5 s1 p0", "relu", "maxpool2",
                  "fc400-120", "fc120-84", f"fc84-{k}"],
        "alexnet": [f"conv{c}-128 k5 s1 p{4 if c == 1 else 2}", "relu", "maxpool2", "conv128-192 k5 s1 p2", "relu",
                    "maxpool2", "conv192-256 k3 s1 p1", "relu", "conv256-192 k3 s1 p1", "relu",
                    "conv192-192 k3 s1 p1", "relu", "maxpool2", f"fc3072-{k}"],
        "vgg11": ref_vgg11(c, k), "resnet18": ref_resnet18(c, k),
    }


@pytest.mark.parametrize("dataset,pixels", [("mnist", 784), ("cifar100", 3072)])
def test_every_layer_matches_the_reference_kind_norm_pooling_stride_and_padding(dataset, pixels):
    spec = get_dataset(dataset)
    want = ref_layers(spec.channels, spec.classes, pixels)
    with torch.device("meta"):
        got = {a: layers(build(a, spec)) for a in ARCHITECTURES}
    for arch in ARCHITECTURES:
        assert got[arch] == want[arch], arch
    # the check can fail: ConvNet-BN differs from ConvNet only in its norms, which a parameter count cannot see
    assert got["convnetbn"] != got["convnet"] and count_equal(spec)


def count_equal(spec) -> bool:
    with torch.device("meta"):
        return count(build("convnetbn", spec)) == count(build("convnet", spec))


# ---------------------------------------------------------------- a forward pass on fixed weights, against the reference

def ref_ops(arch: str, c: int) -> list[tuple]:
    """The reference's forward pass of `arch` as a list of operations, written
    from networks.py: ("conv", padding), ("in"|"bn",), ("relu",),
    ("avg"|"max",), ("flat",), ("fc",). Each conv, norm and fc takes the
    network's next parameters, in the order the reference registers them."""
    one = c == 1

    def convnet(depth, norm):
        return [op for d in range(depth) for op in (("conv", 3 if one and d == 0 else 1), (norm,), ("relu",),
                                                      ("avg",))] + [("flat",), ("fc",)]

    vgg = []
    for n, v in enumerate(VGG11_CFG):
        vgg += [("max",)] if v == "M" else [("conv", 3 if one and n == 0 else 1), ("in",), ("relu",)]
    return {
        "convnet": convnet(3, "in"), "convnetbn": convnet(3, "bn"), "convnetd4": convnet(4, "in"),
        "mlp": [("flat",), ("fc",), ("relu",), ("fc",), ("relu",), ("fc",)],
        "lenet": [("conv", 2 if one else 0), ("relu",), ("max",), ("conv", 0), ("relu",), ("max",), ("flat",),
                  ("fc",), ("relu",), ("fc",), ("relu",), ("fc",)],
        "alexnet": [("conv", 4 if one else 2), ("relu",), ("max",), ("conv", 2), ("relu",), ("max",), ("conv", 1),
                    ("relu",), ("conv", 1), ("relu",), ("conv", 1), ("relu",), ("max",), ("flat",), ("fc",)],
        "vgg11": vgg + [("flat",), ("fc",)],
    }[arch]


def ref_forward(arch: str, params: list, x):
    """`arch`'s output for input `x` with the weights `params` (its
    parameters in registration order), computed with torch.nn.functional
    alone: an implementation of the reference independent of the pool's
    modules, so that a lost activation, a swapped pool or a skipped
    shortcut changes the answer."""
    import torch.nn.functional as F

    p = iter(params)

    def norm(h, kind):
        w, b = next(p), next(p)
        if kind == "bn":  # BatchNorm in training mode: the batch's own statistics
            return F.batch_norm(h, None, None, w, b, training=True, eps=1e-5)
        return F.group_norm(h, h.shape[1], w, b, eps=1e-5)  # "instancenorm": one group per channel, affine

    if arch == "resnet18":
        def conv(h, stride, pad):
            return F.conv2d(h, next(p), None, stride, pad)

        h = F.relu(norm(conv(x, 1, 1), "in"))
        for i, o, s in ((64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)):
            for bi, bs in ((i, s), (o, 1)):  # BasicBlock: conv-norm-relu-conv-norm, plus the shortcut, then relu
                out = norm(conv(F.relu(norm(conv(h, bs, 1), "in")), 1, 1), "in")
                short = norm(conv(h, bs, 0), "in") if bs != 1 or bi != o else h
                h = F.relu(out + short)
        return F.linear(F.avg_pool2d(h, 4).flatten(1), next(p), next(p))
    h = x
    for op in ref_ops(arch, x.shape[1]):
        kind = op[0]
        if kind == "conv":
            h = F.conv2d(h, next(p), next(p), 1, op[1])
        elif kind in ("in", "bn"):
            h = norm(h, kind)
        elif kind == "relu":
            h = F.relu(h)
        elif kind in ("avg", "max"):
            h = (F.avg_pool2d if kind == "avg" else F.max_pool2d)(h, 2, 2)
        elif kind == "flat":
            h = h.flatten(1)
        else:
            h = F.linear(h, next(p), next(p))
    assert next(p, None) is None, "parameters left over: the network has layers the reference does not"
    return h


@pytest.mark.parametrize("dataset", ["mnist", "cifar100"])
def test_every_architecture_computes_the_reference_forward_pass_on_fixed_weights(dataset):
    spec = get_dataset(dataset)
    torch.manual_seed(0)
    x = torch.randn(3, *spec.image_shape)
    for arch in ARCHITECTURES:
        torch.manual_seed(1)
        net = build(arch, spec)
        with torch.no_grad():
            for q in net.parameters():  # norms' affine weights away from 1 and 0 too, so they count
                q.copy_(torch.randn_like(q) * (0.5 if q.dim() == 1 else 1 / q[0].numel() ** 0.5))
            got, want = net(x), ref_forward(arch, list(net.parameters()), x)
        assert got.shape == (3, spec.classes), arch
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (arch, (got - want).abs().max().item())
        assert want.std() > 0.1, arch  # outputs that differ per image and class: a check that can fail
