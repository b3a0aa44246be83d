"""A zoo of small CNNs, built in code with deterministic random weights.

Every builder returns an ``nn.Module`` in eval mode whose weights depend only
on ``seed``.  The module carries its default input shape (batch 1) in the
attribute ``input_shape``; :func:`example_input` turns that into a tensor.

The models are small by default (a few thousand to a few hundred thousand
parameters) so that the whole zoo exports to ONNX and runs in a few seconds.
``width`` scales the channel counts; ``vgg(full=True)`` and
``resnet(full50=True)`` give the real VGG-16 / ResNet-50 shapes for
benchmarks.

Weights are not drawn by PyTorch's default initialisers: modules are built on
the ``meta`` device (no allocation, no init), moved to CPU uninitialised and
then filled from a seeded generator (He-normal conv/linear weights, small
random biases, non-trivial BatchNorm statistics and affine parameters).  This
makes building even the 138M-parameter VGG-16 take about a second.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "ALL_MODELS",
    "BENCHMARK_MODELS",
    "VARIANTS",
    "ZOO",
    "OnnxLRN",
    "DEFAULT_INPUT_SHAPES",
    "alexnet",
    "build",
    "conv1d",
    "example_input",
    "fcn",
    "inception",
    "init_weights",
    "mobilenetv2",
    "resnet",
    "vgg",
]


# --------------------------------------------------------------------------
# weight initialisation
# --------------------------------------------------------------------------


def init_weights(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter and buffer of ``module`` deterministically from ``seed``.

    * Conv / Linear weights: He-normal, ``randn * sqrt(2 / fan_in)``.
    * biases: ``uniform(-0.1, 0.1)``.
    * BatchNorm: ``weight ~ U(0.5, 1.5)``, ``bias ~ 0.1 * N(0, 1)``,
      ``running_mean ~ 0.1 * N(0, 1)``, ``running_var ~ U(0.5, 2.0)``, so that
      the layer is never an identity.
    """
    g = torch.Generator().manual_seed(seed)
    done: set[int] = set()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                w = m.weight
                fan_in = w[0].numel()  # in_channels/groups * prod(kernel)
                w.normal_(0.0, math.sqrt(2.0 / fan_in), generator=g)
                done.add(id(w))
                if m.bias is not None:
                    m.bias.uniform_(-0.1, 0.1, generator=g)
                    done.add(id(m.bias))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g).add_(0.5))
                    m.bias.copy_(torch.randn(n, generator=g).mul_(0.1))
                    done.update((id(m.weight), id(m.bias)))
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(n, generator=g).mul_(0.1))
                    m.running_var.copy_(torch.rand(n, generator=g).mul_(1.5).add_(0.5))
                    m.num_batches_tracked.zero_()
        # Anything left (custom modules) gets a plain scaled normal.
        for p in module.parameters():
            if id(p) not in done:
                p.normal_(0.0, 0.1, generator=g)
    return module


def _finish(build: Callable[[], nn.Module], seed: int, input_shape: Sequence[int]) -> nn.Module:
    """Build on the meta device, materialise uninitialised, init, set eval mode."""
    with torch.device("meta"):
        model = build()
    model = model.to_empty(device="cpu")
    # to_empty leaves garbage in every tensor; zero the buffers before
    # init_weights overwrites the ones it knows about (it sets every parameter).
    with torch.no_grad():
        for b in model.buffers():
            b.zero_()
    init_weights(model, seed)
    post = getattr(model, "_post_init", None)
    if post is not None:
        with torch.no_grad():
            post()
    model.eval()
    model.input_shape = tuple(int(d) for d in input_shape)
    return model


# --------------------------------------------------------------------------
# VGG-16
# --------------------------------------------------------------------------

_VGG16_CONVS = (2, 2, 3, 3, 3)


class VGG(nn.Module):
    def __init__(self, widths, convs, in_ch, spatial, hidden, num_classes, dropout):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_ch
        for w, n in zip(widths, convs):
            for _ in range(n):
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True)]
                c = w
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        s = spatial // 2 ** len(widths)
        self.classifier = nn.Sequential(
            nn.Linear(c * s * s, hidden),  # fc6
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),  # fc7
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),  # fc8
        )

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg(
    width: int = 8,
    size: int = 64,
    num_classes: int = 10,
    hidden: int | None = None,
    full: bool = False,
    seed: int = 0,
) -> nn.Module:
    """VGG-16: 13 3x3 convs (pad 1) in 5 stages of (2, 2, 3, 3, 3), each stage
    ending with MaxPool 2x2/2, then flatten + fc6/fc7/fc8 (Linear, ReLU, Dropout).

    Stage widths are ``width * (1, 2, 4, 8, 8)``; ``size`` must be a multiple of
    32 (default 64 -> 2x2 last map).  ``hidden`` defaults to ``8 * width``.
    ``full=True``: real VGG-16 (widths 64..512, 224x224 input,
    7*7*512 -> 4096 -> 4096 -> 1000, ~138M params).
    """
    if full:
        width, size, num_classes, hidden = 64, 224, 1000, 4096
    if hidden is None:
        hidden = 8 * width
    if size % 32:
        raise ValueError(f"vgg: size must be a multiple of 32, got {size}")
    widths = [width * m for m in (1, 2, 4, 8, 8)]
    return _finish(
        lambda: VGG(widths, _VGG16_CONVS, 3, size, hidden, num_classes, 0.5),
        seed,
        (1, 3, size, size),
    )


# --------------------------------------------------------------------------
# FCN (VGG backbone, convolutionalised fc6/fc7, 1x1 score layer)
# --------------------------------------------------------------------------


class FCN(nn.Module):
    def __init__(self, widths, convs, in_ch, fc_width, fc6_kernel, fc6_padding, num_classes):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_ch
        for w, n in zip(widths, convs):
            for _ in range(n):
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True)]
                c = w
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.fc6 = nn.Conv2d(c, fc_width, fc6_kernel, padding=fc6_padding)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout2d()
        self.fc7 = nn.Conv2d(fc_width, fc_width, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout2d()
        self.score = nn.Conv2d(fc_width, num_classes, 1)

    def forward(self, x):
        x = self.features(x)
        x = self.drop6(self.relu6(self.fc6(x)))
        x = self.drop7(self.relu7(self.fc7(x)))
        return self.score(x)


def fcn(
    width: int = 8,
    size: int = 64,
    num_classes: int = 5,
    stages: int = 4,
    fc6_kernel: int = 3,
    fc6_padding: int = 0,
    seed: int = 0,
) -> nn.Module:
    """FCN-style fully convolutional net: VGG-like backbone of ``stages``
    stages (2 convs + MaxPool 2x2/2 each, widths ``width * 2**i`` capped at
    ``8*width``), then conv fc6 (``fc6_kernel`` x ``fc6_kernel``, padding
    ``fc6_padding``) + ReLU + Dropout2d, 1x1 conv fc7 + ReLU + Dropout2d,
    1x1 score conv to ``num_classes``.  No upsampling, no flatten.

    Default: 64x64 input -> 4x4 after 4 pools -> 2x2 score map (1, 5, 2, 2).
    """
    widths = [width * min(2**i, 8) for i in range(stages)]
    convs = [2] * stages
    return _finish(
        lambda: FCN(widths, convs, 3, 8 * width, fc6_kernel, fc6_padding, num_classes),
        seed,
        (1, 3, size, size),
    )


# --------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision "v1.5" bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers, width, num_classes, stem_kernel):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, stem_kernel, 2, stem_kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c = width
        stages = []
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(c, planes, stride))
                c = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def _post_init(self):
        # Damp the residual branches (like zero_init_residual, but not zero)
        # so that activations do not blow up with depth.
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                last_bn = m.bn3 if isinstance(m, Bottleneck) else m.bn2
                last_bn.weight.mul_(0.2)
            if isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[1], nn.BatchNorm2d):
                m[1].weight.mul_(0.5)  # downsample branch

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet(
    width: int = 8,
    size: int = 64,
    layers: Sequence[int] = (2, 2, 2, 2),
    bottleneck: bool = False,
    num_classes: int = 10,
    stem_kernel: int = 7,
    full50: bool = False,
    seed: int = 0,
) -> nn.Module:
    """ResNet: stem conv ``stem_kernel``/2 + BN + ReLU + MaxPool 3x3/2 pad 1,
    four stages of BasicBlocks (ResNet-18 layout by default) or Bottlenecks
    (``bottleneck=True``), the first block of stages 2-4 strided (3x3 conv
    stride 2, downsample = 1x1 conv stride 2 + BN), residual Add, then
    AdaptiveAvgPool2d(1) + flatten + Linear.

    Default: width 8, 64x64 input -> 2x2 before the global pool.
    ``full50=True``: ResNet-50 (bottleneck, [3, 4, 6, 3], width 64, 224x224,
    1000 classes, ~25.6M params).
    """
    if full50:
        width, size, layers, bottleneck, num_classes, stem_kernel = 64, 224, (3, 4, 6, 3), True, 1000, 7
    if len(layers) != 4:
        raise ValueError("resnet: layers must have 4 entries")
    block = Bottleneck if bottleneck else BasicBlock
    return _finish(
        lambda: ResNet(block, list(layers), width, num_classes, stem_kernel),
        seed,
        (1, 3, size, size),
    )


# --------------------------------------------------------------------------
# MobileNetV2
# --------------------------------------------------------------------------


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_bn_relu6(cin, cout, k, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand_ratio):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(cin, hidden, 1))  # expand
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, cout, 1, bias=False),  # project (linear)
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


# (expand ratio t, channels c, repeats n, stride s) of the real MobileNetV2
_MBV2_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    def __init__(self, mult, num_classes, setting, dropout=0.2):
        super().__init__()
        cin = _make_divisible(32 * mult)
        last = _make_divisible(1280 * mult)
        features: list[nn.Module] = [_conv_bn_relu6(3, cin, 3, 2)]
        for t, c, n, s in setting:
            cout = _make_divisible(c * mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(_conv_bn_relu6(cin, last, 1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenetv2(
    width: int = 8,
    size: int = 64,
    num_classes: int = 10,
    repeats: Sequence[int] | None = (1, 2, 2, 2, 1, 1, 1),
    seed: int = 0,
) -> nn.Module:
    """MobileNetV2: stem conv 3x3/2 + BN + ReLU6, inverted residual blocks
    (1x1 expand + BN + ReLU6, 3x3 depthwise stride 1/2 + BN + ReLU6, 1x1
    linear project + BN; residual Add where stride 1 and cin == cout), final
    1x1 conv + BN + ReLU6, AdaptiveAvgPool2d(1) + flatten + Dropout + Linear.

    ``width`` is the stem width (32 in the real network), all channels scale
    by ``width / 32`` (rounded to multiples of 8).  ``repeats`` overrides the
    per-stage block counts (real: 1, 2, 3, 4, 3, 3, 1; ``None`` = real);
    the default keeps every stride and every block kind but fewer repeats.
    Default 64x64 input -> 2x2 before the global pool.
    """
    setting = list(_MBV2_SETTING)
    if repeats is not None:
        if len(repeats) != len(setting):
            raise ValueError("mobilenetv2: repeats must have 7 entries")
        setting = [(t, c, int(n), s) for (t, c, _, s), n in zip(setting, repeats)]
    mult = width / 32.0
    return _finish(lambda: MobileNetV2(mult, num_classes, setting), seed, (1, 3, size, size))


# --------------------------------------------------------------------------
# Inception (GoogLeNet-like)
# --------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, k, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class InceptionBlock(nn.Module):
    """Four parallel branches concatenated on channels:
    1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 (or 1x1 -> 3x3 -> 3x3) | MaxPool 3x3/1 pad 1 -> 1x1.
    """

    def __init__(self, cin, c1, c3r, c3, c5r, c5, cp, five_by_five=True):
        super().__init__()
        self.branch1 = BasicConv2d(cin, c1, 1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, c3r, 1), BasicConv2d(c3r, c3, 3, padding=1))
        if five_by_five:
            self.branch3 = nn.Sequential(BasicConv2d(cin, c5r, 1), BasicConv2d(c5r, c5, 5, padding=2))
        else:
            self.branch3 = nn.Sequential(
                BasicConv2d(cin, c5r, 1),
                BasicConv2d(c5r, c5, 3, padding=1),
                BasicConv2d(c5, c5, 3, padding=1),
            )
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), BasicConv2d(cin, cp, 1))
        self.out_channels = c1 + c3 + c5 + cp

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class Inception(nn.Module):
    def __init__(self, w, num_classes, five_by_five):
        super().__init__()
        self.conv1 = BasicConv2d(3, 2 * w, 3, stride=2, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, 2, 1)
        self.conv2 = BasicConv2d(2 * w, 4 * w, 3, padding=1)
        c = 4 * w
        self.inception3a = InceptionBlock(c, 2 * w, 2 * w, 4 * w, w, w, w, five_by_five)
        c = self.inception3a.out_channels
        self.inception3b = InceptionBlock(c, 4 * w, 4 * w, 4 * w, w, 2 * w, 2 * w, five_by_five)
        c = self.inception3b.out_channels
        self.maxpool3 = nn.MaxPool2d(3, 2, 1)
        self.inception4a = InceptionBlock(c, 4 * w, 3 * w, 6 * w, w, 2 * w, 2 * w, five_by_five)
        c = self.inception4a.out_channels
        self.maxpool4 = nn.MaxPool2d(2, 2)
        self.inception5a = InceptionBlock(c, 6 * w, 4 * w, 8 * w, w, 2 * w, 2 * w, five_by_five)
        c = self.inception5a.out_channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.maxpool1(self.conv1(x))
        x = self.conv2(x)
        x = self.inception3b(self.inception3a(x))
        x = self.maxpool3(x)
        x = self.inception4a(x)
        x = self.maxpool4(x)
        x = self.inception5a(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(self.dropout(x))


def inception(
    width: int = 4,
    size: int = 64,
    num_classes: int = 10,
    five_by_five: bool = True,
    seed: int = 0,
) -> nn.Module:
    """GoogLeNet-like: conv 3x3/2 + MaxPool 3x3/2 pad 1, conv 3x3, inception
    3a, 3b, MaxPool 3x3/2 pad 1, inception 4a, MaxPool 2x2/2, inception 5a,
    AdaptiveAvgPool2d(1) + flatten + Dropout + Linear.  Convs are conv + BN
    (eps 1e-3) + ReLU.  ``five_by_five=False`` replaces the 5x5 branch by two
    3x3 convs.  Default 64x64 -> 16x16 (3a/3b) -> 8x8 (4a) -> 4x4 (5a).
    """
    return _finish(lambda: Inception(width, num_classes, five_by_five), seed, (1, 3, size, size))


# --------------------------------------------------------------------------
# AlexNet (original, with LRN and ceil_mode pools)
# --------------------------------------------------------------------------


def _alexnet_feature_size(size: int) -> int:
    s = (size + 2 * 2 - 11) // 4 + 1  # conv1 11x11/4 pad 2
    s = math.ceil((s - 3) / 2) + 1  # pool1 (ceil); conv2/3/4/5 keep size
    s = math.ceil((s - 3) / 2) + 1  # pool2
    s = math.ceil((s - 3) / 2) + 1  # pool5
    return s


@torch.library.custom_op("onnx_dense_samples::lrn", mutates_args=())
def _lrn_op(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    return nn.functional.local_response_norm(x, size, alpha, beta, k)


@_lrn_op.register_fake
def _lrn_op_fake(x, size, alpha, beta, k):
    return torch.empty_like(x)


class OnnxLRN(nn.LocalResponseNorm):
    """``nn.LocalResponseNorm`` that exports to a single ONNX ``LRN`` node.

    PyTorch's LRN is a Python composite (square, 5-D view, pad, avg_pool3d,
    ...) and both exporters trace through it, baking the spatial size into
    Reshape constants.  This variant calls the opaque custom op
    ``torch.ops.onnx_dense_samples.lrn``; ``samples.export`` maps it to ONNX
    ``LRN`` (same semantics for odd ``size``) for both exporters.
    """

    def forward(self, x):
        return torch.ops.onnx_dense_samples.lrn(x, self.size, self.alpha, self.beta, self.k)


class AlexNet(nn.Module):
    def __init__(self, w, size, hidden, num_classes, dropout=0.5, lrn="torch"):
        super().__init__()
        c1, c2, c3, c4, c5 = w, 3 * w, 6 * w, 4 * w, 4 * w
        if lrn not in ("torch", "onnx"):
            raise ValueError(f"alexnet: lrn must be 'torch' or 'onnx', got {lrn!r}")
        LRN = nn.LocalResponseNorm if lrn == "torch" else OnnxLRN
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            LRN(5, alpha=1e-4, beta=0.75, k=2.0),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.ReLU(inplace=True),
            LRN(5, alpha=1e-4, beta=0.75, k=2.0),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, ceil_mode=True),
        )
        s = _alexnet_feature_size(size)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(c5 * s * s, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def alexnet(
    width: int = 8,
    size: int = 72,
    num_classes: int = 10,
    hidden: int | None = None,
    lrn: str = "torch",
    seed: int = 0,
) -> nn.Module:
    """Original AlexNet (single tower): conv 11x11/4 pad 2, ReLU, LRN(5),
    MaxPool 3x3/2 ceil_mode, conv 5x5 pad 2, ReLU, LRN, MaxPool 3x3/2
    ceil_mode, three 3x3 convs + ReLU, MaxPool 3x3/2 ceil_mode, flatten,
    Dropout/Linear/ReLU x2 + Linear.

    Channels are ``width * (1, 3, 6, 4, 4)`` (real AlexNet ~ width 64 with
    (64, 192, 384, 256, 256)).  Default input 72x72: conv1 -> 17x17,
    pool1 -> 8x8 (exact), pool2 on 8x8 -> 4x4 (floor would give 3x3: partial
    last window), pool5 on 4x4 -> 2x2 (floor would give 1x1: partial last
    window).  So 2 of the 3 ceil_mode pools really use ceil.

    ``lrn="torch"`` uses ``nn.LocalResponseNorm`` (exported as a decomposed
    Mul/Reshape/Pad/AveragePool/.../Pow/Div chain with the spatial size baked
    into Reshape constants); ``lrn="onnx"`` uses :class:`OnnxLRN`, exported as
    one ONNX ``LRN`` node (export through :func:`samples.export.export_onnx`).
    """
    if hidden is None:
        hidden = 8 * width
    return _finish(lambda: AlexNet(width, size, hidden, num_classes, lrn=lrn), seed, (1, 3, size, size))


# --------------------------------------------------------------------------
# 1-D conv net
# --------------------------------------------------------------------------


class Conv1dNet(nn.Module):
    def __init__(self, cin, w, num_classes):
        super().__init__()
        self.conv1 = nn.Conv1d(cin, w, 7, padding=3)
        self.bn1 = nn.BatchNorm1d(w)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool1d(2, 2)
        self.conv2 = nn.Conv1d(w, 2 * w, 5, stride=2, padding=2)
        self.bn2 = nn.BatchNorm1d(2 * w)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool2 = nn.AvgPool1d(2, 2)
        self.conv3 = nn.Conv1d(2 * w, 2 * w, 3, padding=1)
        self.relu3 = nn.ReLU(inplace=True)
        self.head = nn.Conv1d(2 * w, num_classes, 1)

    def forward(self, x):
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.conv3(x))
        return self.head(x)


def conv1d(
    width: int = 8,
    length: int = 128,
    in_channels: int = 4,
    num_classes: int = 5,
    seed: int = 0,
) -> nn.Module:
    """1-D fully convolutional net: Conv1d k7 pad 3 + BN1d + ReLU + MaxPool1d
    2/2, Conv1d k5 stride 2 pad 2 + BN1d + ReLU + AvgPool1d 2/2, Conv1d k3 pad
    1 + ReLU, 1x1 Conv1d to ``num_classes``.  Input (1, 4, 128) -> output
    (1, 5, 16).
    """
    return _finish(lambda: Conv1dNet(in_channels, width, num_classes), seed, (1, in_channels, length))


# --------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------

#: The core zoo: one small model per family (what tests iterate over).
ZOO: dict[str, Callable[..., nn.Module]] = {
    "vgg": vgg,
    "fcn": fcn,
    "resnet": resnet,
    "mobilenetv2": mobilenetv2,
    "inception": inception,
    "alexnet": alexnet,
    "conv1d": conv1d,
}

#: Small variants exercising other graph patterns.
VARIANTS: dict[str, Callable[..., nn.Module]] = {
    "resnet_bottleneck": functools.partial(resnet, bottleneck=True),
    "inception_3x3": functools.partial(inception, five_by_five=False),
    "alexnet_lrn": functools.partial(alexnet, lrn="onnx"),  # one ONNX LRN node
}

#: Real-size networks for benchmarks (slow to export/run; not for unit tests).
BENCHMARK_MODELS: dict[str, Callable[..., nn.Module]] = {
    "vgg16": functools.partial(vgg, full=True),  # 138.4M params, 553 MB ONNX
    "resnet50": functools.partial(resnet, full50=True),  # 25.6M params, 102 MB ONNX
}

ALL_MODELS: dict[str, Callable[..., nn.Module]] = {**ZOO, **VARIANTS, **BENCHMARK_MODELS}

DEFAULT_INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "resnet_bottleneck": (1, 3, 64, 64),
    "inception_3x3": (1, 3, 64, 64),
    "alexnet_lrn": (1, 3, 72, 72),
    "vgg16": (1, 3, 224, 224),
    "resnet50": (1, 3, 224, 224),
    "vgg": (1, 3, 64, 64),
    "fcn": (1, 3, 64, 64),
    "resnet": (1, 3, 64, 64),
    "mobilenetv2": (1, 3, 64, 64),
    "inception": (1, 3, 64, 64),
    "alexnet": (1, 3, 72, 72),
    "conv1d": (1, 4, 128),
}


def build(name: str, **kwargs) -> nn.Module:
    """``ALL_MODELS[name](**kwargs)`` with a helpful error for unknown names."""
    try:
        builder = ALL_MODELS[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ALL_MODELS)}") from None
    return builder(**kwargs)


def example_input(name_or_module: str | nn.Module, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A seeded ``randn`` input of the model's default shape with batch ``batch``."""
    if isinstance(name_or_module, str):
        if name_or_module not in DEFAULT_INPUT_SHAPES:
            raise KeyError(f"unknown zoo model {name_or_module!r}; known: {', '.join(ALL_MODELS)}")
        shape = DEFAULT_INPUT_SHAPES[name_or_module]
    else:
        shape = getattr(name_or_module, "input_shape", None)
        if shape is None:
            raise ValueError("module has no `input_shape` attribute; build it with samples.zoo")
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *shape[1:]), generator=g)
