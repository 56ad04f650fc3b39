import pytest
import torch
from torch import nn

from ddchallenge.evaluation.nets import reference_convnet
from ddchallenge.protocol import get_dataset


def official_param_count(channels, classes, size, width=128, depth=3):
    convs = (channels * width * 9 + width) + (depth - 1) * (width * width * 9 + width)
    norms = depth * 2 * width
    feat = (32 if size == 28 else size) // 2**depth
    return convs + norms + width * feat * feat * classes + classes


@pytest.mark.parametrize(
    "name, total, linear_in",
    [("cifar100", 504_420, 2048), ("tinyimagenet", 1_938_120, 8192), ("mnist5k", 317_706, 2048), ("cifar10", 320_010, 2048)],
)
def test_parameter_counts_and_classifier_width(name, total, linear_in):
    spec = get_dataset(name)
    net = reference_convnet(spec)
    assert sum(p.numel() for p in net.parameters()) == total == official_param_count(spec.channels, spec.classes, spec.size)
    assert net.classifier.in_features == linear_in
    out = net(torch.zeros(2, *spec.image_shape))
    assert out.shape == (2, spec.classes)


def test_layer_sequence_matches_official_names_and_shapes():
    net = reference_convnet(get_dataset("mnist5k"))
    kinds = [type(m) for m in net.features]
    assert kinds == [nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.AvgPool2d] * 3
    first = net.features[0]
    assert (first.in_channels, first.out_channels, first.kernel_size, first.padding) == (1, 128, (3, 3), (3, 3))
    assert all(net.features[i].padding == (1, 1) for i in (4, 8))
    norm = net.features[1]
    assert (norm.num_groups, norm.num_channels, norm.affine) == (128, 128, True)
    pool = net.features[3]
    assert (pool.kernel_size, pool.stride) == (2, 2)
    names = [n for n, _ in net.named_parameters()]
    assert names[:4] == ["features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias"]
    assert names[-2:] == ["classifier.weight", "classifier.bias"]


def test_28px_padding_makes_32px_feature_maps():
    net = reference_convnet(get_dataset("mnist5k"))
    assert net.features[:1](torch.zeros(1, 1, 28, 28)).shape == (1, 128, 32, 32)
    assert net.features(torch.zeros(1, 1, 28, 28)).shape == (1, 128, 4, 4)


def test_tinyimagenet_keeps_depth_3():
    net = reference_convnet(get_dataset("tinyimagenet"))
    assert net.features(torch.zeros(1, 3, 64, 64)).shape == (1, 128, 8, 8)
