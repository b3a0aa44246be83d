"""Networks that dilation alone cannot make dense: global context and upsampling.

Built like ``samples.zoo`` (meta device, deterministic ``init_weights``, eval mode,
``input_shape`` attribute), with its ``_finish``:

* ``mobilenetv3``: MobileNetV3-style. Stem 3x3/2 conv + BN + HardSwish; inverted residual
  blocks (1x1 expand + BN + act, kxk depthwise stride 1/2 + BN + act, optional
  squeeze-and-excitation: AdaptiveAvgPool2d(1) -> 1x1 conv -> ReLU -> 1x1 conv -> Hardsigmoid
  -> x * scale, 1x1 project + BN, residual where stride 1 and cin == cout); last 1x1 conv +
  BN + HardSwish; then either the classifier (AdaptiveAvgPool2d(1), Linear, HardSwish,
  Dropout, Linear) or, with ``head=False``, a 1x1 conv to ``num_classes`` (a fully
  convolutional segmentation-style output). Total stride 32; every strided op is a 3x3 or 5x5
  conv with pad k//2, so at even sizes every removed stride divides the map.
* ``unet``: a small U-Net / FPN hybrid. Encoder: conv-BN-ReLU at strides 1, 2, 4, 8 with 2x2
  max pools between; decoder: upsample x2 (nearest or bilinear) -> concat with the encoder
  map -> conv-BN-ReLU at stride 4 and again at stride 2. Two outputs (FPN-style heads, 1x1
  convs): ``p4`` at stride 4 and ``p2`` at stride 2.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from samples.zoo import _finish, _make_divisible

__all__ = ["CONTEXT_ZOO", "mobilenetv3", "unet", "build"]


# --------------------------------------------------------------------------
# MobileNetV3-style
# --------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    def __init__(self, ch: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(ch, squeeze, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, ch, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.relu(self.fc1(s))))


def _conv_bn_act(cin, cout, k, stride=1, groups=1, act=nn.Hardswish):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act(),
    )


class InvertedResidualSE(nn.Module):
    def __init__(self, cin, k, hidden, cout, se, act, stride):
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if hidden != cin:
            layers.append(_conv_bn_act(cin, hidden, 1, act=act))
        layers.append(_conv_bn_act(hidden, hidden, k, stride, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcite(hidden, _make_divisible(hidden // 4, 8)))
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


# (kernel, expanded channels, out channels, SE, activation, stride) of mobilenet_v3_small,
# one block per stage of the real network
_MBV3_SMALL = (
    (3, 16, 16, True, "RE", 2),
    (3, 72, 24, False, "RE", 2),
    (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),
    (5, 240, 40, True, "HS", 1),
    (5, 288, 96, True, "HS", 2),
)


class MobileNetV3(nn.Module):
    def __init__(self, mult: float, num_classes: int, head: bool, last: int = 576, hidden: int = 1024):
        super().__init__()
        stem = _make_divisible(16 * mult)
        layers: list[nn.Module] = [_conv_bn_act(3, stem, 3, 2)]
        cin = stem
        for k, exp, out, se, act, s in _MBV3_SMALL:
            exp_c, out_c = _make_divisible(exp * mult), _make_divisible(out * mult)
            act_cls = nn.ReLU if act == "RE" else nn.Hardswish
            layers.append(InvertedResidualSE(cin, k, exp_c, out_c, se, act_cls, s))
            cin = out_c
        last_c = _make_divisible(last * mult)
        layers.append(_conv_bn_act(cin, last_c, 1))
        self.features = nn.Sequential(*layers)
        self.head = head
        if head:
            hid = _make_divisible(hidden * mult)
            self.classifier = nn.Sequential(
                nn.Linear(last_c, hid), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(hid, num_classes)
            )
        else:
            self.classifier = nn.Conv2d(last_c, num_classes, 1)

    def forward(self, x):
        x = self.features(x)
        if not self.head:
            return self.classifier(x)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenetv3(width: float = 0.5, size: int = 64, num_classes: int = 10, head: bool = True, seed: int = 0) -> nn.Module:
    """MobileNetV3-small-style net with SE blocks (see module docstring); ``width`` multiplies
    every channel count (rounded to multiples of 8). 64x64 input -> 2x2 before the head."""
    return _finish(lambda: MobileNetV3(width, num_classes, head), seed, (1, 3, size, size))


# --------------------------------------------------------------------------
# U-Net / FPN-style
# --------------------------------------------------------------------------


def _cbr(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    def __init__(self, w: int, num_classes: int, mode: str):
        super().__init__()
        self.mode = mode
        self.enc1 = _cbr(3, w)
        self.enc2 = _cbr(w, 2 * w)
        self.enc3 = _cbr(2 * w, 4 * w)
        self.bottleneck = _cbr(4 * w, 8 * w)
        self.dec3 = _cbr(12 * w, 4 * w)
        self.dec2 = _cbr(6 * w, 2 * w)
        self.head4 = nn.Conv2d(4 * w, num_classes, 1)
        self.head2 = nn.Conv2d(2 * w, num_classes, 1)

    def up(self, x):
        if self.mode == "nearest":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x):
        e1 = self.enc1(x)  # stride 1
        e2 = self.enc2(F.max_pool2d(e1, 2))  # stride 2
        e3 = self.enc3(F.max_pool2d(e2, 2))  # stride 4
        b = self.bottleneck(F.max_pool2d(e3, 2))  # stride 8
        d3 = self.dec3(torch.cat([self.up(b), e3], 1))  # stride 4
        d2 = self.dec2(torch.cat([self.up(d3), e2], 1))  # stride 2
        return self.head2(d2), self.head4(d3)


def unet(width: int = 4, size: int = 32, num_classes: int = 3, mode: str = "nearest", seed: int = 0) -> nn.Module:
    """U-Net/FPN-style net with two outputs, ``p2`` (stride 2) and ``p4`` (stride 4)."""
    model = _finish(lambda: UNet(width, num_classes, mode), seed, (1, 3, size, size))
    model.output_names = ["p2", "p4"]
    return model


CONTEXT_ZOO = {
    "mobilenetv3": mobilenetv3,
    "mobilenetv3_fcn": functools.partial(mobilenetv3, head=False),
    "unet": unet,
    "unet_bilinear": functools.partial(unet, mode="bilinear"),
}


def build(name: str, **kwargs) -> nn.Module:
    try:
        return CONTEXT_ZOO[name](**kwargs)
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(CONTEXT_ZOO)}") from None


def export(model: nn.Module, path, exporter: str = "torchscript", shape: Sequence[int] | None = None):
    """Export like ``samples.export.export_onnx`` (same exporters, quiet), naming every output
    (``model.output_names``, default ``["output"]``)."""
    from pathlib import Path

    from samples.export import EXPORTERS, _example, _quiet

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = _example(model, shape or model.input_shape)
    names = list(getattr(model, "output_names", ["output"]))
    kwargs = {"external_data": False} if exporter == "dynamo" else {}
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            model, (x,), str(path), dynamo=exporter == "dynamo", input_names=["input"], output_names=names,
            verbose=False, **kwargs,
        )
    return path
