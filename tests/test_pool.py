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
