"""Segmentation and text-detection heads that upsample back to the input size (small, random weights).

Built like ``samples.zoo`` (meta device, deterministic ``init_weights``, eval mode,
``input_shape`` attribute); :func:`export` writes them with either torch exporter.

* ``fcn8s``: the FCN-8s of Long et al.: VGG-16-like backbone (2, 2, 3, 3, 3 convs, 2x2 max
  pools: pool3 at stride 8, pool4 at 16, pool5 at 32), fc6 (7x7) and fc7 (1x1) as
  convolutions, score_fr; upscore2 (ConvTranspose 4x4/2, bilinear-initialised and learned:
  a little noise on the kernel), crop, + score_pool4; upscore_pool4 (the same), crop, +
  score_pool3 ("fuse_pool3", stride 8); upscore8 (ConvTranspose 16x16/8, the fixed bilinear
  kernel, no bias) and a crop to the input size. Crops are ``x[:, :, o:-o, o:-o]`` (Slice),
  so the model runs at every input size that is a multiple of 32.
* ``deeplabv3``: a stride-8 backbone, ASPP (1x1, two dilated 3x3, image pooling:
  AdaptiveAvgPool(1) + 1x1 conv + BN + ReLU + bilinear Resize back), projection, 3x3 conv,
  classifier, bilinear upsampling to the input size (align_corners False).
* ``lraspp``: LR-ASPP: stride-8 "low" and stride-16 "high" features; high -> 1x1 conv-BN-ReLU
  times a global branch (AdaptiveAvgPool(1) + 1x1 conv + Sigmoid), bilinear x2, classifier +
  low classifier, bilinear x8.
* ``fpn``: FPN segmentation decoder as segmentation libraries build it: encoder at strides
  4..32, lateral 1x1 convs, top-down nearest x2 + Add, per level conv3x3 + GroupNorm + ReLU
  (+ bilinear x2) until stride 4, Add merge, 1x1 head, bilinear x4.
* ``unet``: U-Net with a stride-2 first encoder level (as ResNet-style encoders give): decoder
  blocks nearest x2 + concat skip + 2 conv-BN-ReLU at strides 8, 4, 2, and a last block at
  stride 1 with no skip (nearest x2 + convs), 3x3 head. Its final block is learned.
* ``dbnet``: a DBNet-style text detector, exported as PaddleOCR's are: backbone with
  HardSigmoid squeeze-and-excitation, FPN to stride 4 (nearest upsampling to sizes read from
  Shape), concat, head 3x3 conv-BN-ReLU, ConvTranspose 2x2/2-BN-ReLU, ConvTranspose 2x2/2,
  Sigmoid (learned final upsampling); :func:`export` with ``dynamic=True`` declares the input
  as (?, 3, ?, ?).

``python -m samples.segmentation OUTDIR`` writes every model with both exporters
(``<name>_<exporter>.onnx``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samples.zoo import _finish

__all__ = ["SEGMENTATION", "build", "export", "bilinear_weight"]


def bilinear_weight(channels: int, kernel: int, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """(channels, channels, k, k): the bilinear upsampling kernel on the diagonal (FCN's init)."""
    factor = (kernel + 1) // 2
    centre = factor - 1 if kernel % 2 == 1 else factor - 0.5
    og = np.ogrid[:kernel, :kernel]
    filt = (1 - abs(og[0] - centre) / factor) * (1 - abs(og[1] - centre) / factor)
    w = np.zeros((channels, channels, kernel, kernel), dtype=np.float32)
    w[range(channels), range(channels)] = filt
    if noise:
        w += noise * np.random.default_rng(seed).standard_normal(w.shape).astype(np.float32)
    return torch.from_numpy(w)


def _crop(x: torch.Tensor, offset: int) -> torch.Tensor:
    """FCN's crop, as a Slice that holds at every input size (a multiple of 32): the transposed
    conv's output is the aligned map plus ``offset`` on each side."""
    return x[:, :, offset:-offset, offset:-offset]


def _cbr(cin, cout, k=3, stride=1, dilation=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, padding=dilation * (k // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


# --------------------------------------------------------------------------------- FCN-8s


class FCN8s(nn.Module):
    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        convs = [2, 2, 3, 3, 3]
        c = 3
        stages = []
        for w, n in zip(widths, convs):
            layers: list[nn.Module] = []
            for _ in range(n):
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True)]
                c = w
            layers.append(nn.MaxPool2d(2, 2))
            stages.append(nn.Sequential(*layers))
        self.stage1, self.stage2, self.stage3, self.stage4, self.stage5 = stages
        fc = 16 * width
        self.fc6 = nn.Conv2d(c, fc, 7, padding=3)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.score_fr = nn.Conv2d(fc, num_classes, 1)
        self.score_pool4 = nn.Conv2d(8 * width, num_classes, 1)
        self.score_pool3 = nn.Conv2d(4 * width, num_classes, 1)
        self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.upscore8 = nn.ConvTranspose2d(num_classes, num_classes, 16, stride=8, bias=False)
        self.num_classes = num_classes

    def _post_init(self) -> None:
        n = self.num_classes
        self.upscore2.weight.copy_(bilinear_weight(n, 4, noise=0.05, seed=1))  # learned, bilinear-initialised
        self.upscore_pool4.weight.copy_(bilinear_weight(n, 4, noise=0.05, seed=2))
        self.upscore8.weight.copy_(bilinear_weight(n, 16))  # fixed, as in FCN-8s

    def forward(self, x):
        pool3 = self.stage3(self.stage2(self.stage1(x)))
        pool4 = self.stage4(pool3)
        h = self.stage5(pool4)
        h = F.relu(self.fc6(h))
        h = F.relu(self.fc7(h))
        h = self.score_fr(h)
        upscore2 = self.upscore2(h)
        score_pool4 = self.score_pool4(pool4)
        fuse_pool4 = _crop(upscore2, 1) + score_pool4
        upscore_pool4 = self.upscore_pool4(fuse_pool4)
        score_pool3 = self.score_pool3(pool3)
        fuse_pool3 = _crop(upscore_pool4, 1) + score_pool3
        return _crop(self.upscore8(fuse_pool3), 4)


def fcn8s(width: int = 4, size: int = 64, num_classes: int = 5, seed: int = 0) -> nn.Module:
    return _finish(lambda: FCN8s(width, num_classes), seed, (1, 3, size, size))


# ------------------------------------------------------------------------------ DeepLabv3


def _backbone8(width: int) -> nn.Sequential:
    """Stride 8: three stride-2 conv-BN-ReLU, a 3x3 each between."""
    w = width
    return nn.Sequential(
        _cbr(3, w, stride=2), _cbr(w, w), _cbr(w, 2 * w, stride=2), _cbr(2 * w, 2 * w),
        _cbr(2 * w, 4 * w, stride=2), _cbr(4 * w, 4 * w),
    )


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int, rates: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_cbr(cin, cout, 1)] + [_cbr(cin, cout, 3, dilation=r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                                  nn.ReLU(inplace=True))
        self.project = _cbr((len(rates) + 2) * cout, cout, 1)

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat(outs + [pooled], dim=1))


class DeepLabV3(nn.Module):
    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = _backbone8(width)
        self.aspp = ASPP(4 * width, 4 * width, (2, 3))
        self.head = _cbr(4 * width, 4 * width)
        self.classifier = nn.Conv2d(4 * width, num_classes, 1)

    def forward(self, x):
        h = self.classifier(self.head(self.aspp(self.backbone(x))))
        return F.interpolate(h, size=x.shape[-2:], mode="bilinear", align_corners=False)


def deeplabv3(width: int = 8, size: int = 64, num_classes: int = 5, seed: int = 0) -> nn.Module:
    return _finish(lambda: DeepLabV3(width, num_classes), seed, (1, 3, size, size))


# -------------------------------------------------------------------------------- LR-ASPP


class LRASPP(nn.Module):
    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        w = width
        self.low = _backbone8(w)
        self.high = nn.Sequential(_cbr(4 * w, 8 * w, stride=2), _cbr(8 * w, 8 * w))
        self.cbr = _cbr(8 * w, 4 * w, 1)
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8 * w, 4 * w, 1, bias=False), nn.Sigmoid())
        self.low_classifier = nn.Conv2d(4 * w, num_classes, 1)
        self.high_classifier = nn.Conv2d(4 * w, num_classes, 1)

    def forward(self, x):
        low = self.low(x)
        high = self.high(low)
        h = self.cbr(high) * self.scale(high)
        h = F.interpolate(h, size=low.shape[-2:], mode="bilinear", align_corners=False)
        h = self.low_classifier(low) + self.high_classifier(h)
        return F.interpolate(h, size=x.shape[-2:], mode="bilinear", align_corners=False)


def lraspp(width: int = 8, size: int = 64, num_classes: int = 5, seed: int = 0) -> nn.Module:
    return _finish(lambda: LRASPP(width, num_classes), seed, (1, 3, size, size))


# ------------------------------------------------------------------------------------ FPN


def _encoder(width: int, se: bool = False) -> nn.ModuleList:
    """Levels at strides 4, 8, 16, 32 (``se``: HardSigmoid squeeze-and-excitation in each)."""
    w = width
    levels = [nn.Sequential(_cbr(3, w, stride=2), _cbr(w, w, stride=2))]
    c = w
    for k in range(3):
        layers = [_cbr(c, 2 * c, stride=2), _cbr(2 * c, 2 * c)]
        if se:
            layers.append(SE(2 * c))
        levels.append(nn.Sequential(*layers))
        c *= 2
    return nn.ModuleList(levels)


class SE(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(ch, max(ch // 4, 4), 1)
        self.fc2 = nn.Conv2d(max(ch // 4, 4), ch, 1)

    def forward(self, x):
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))
        return x * s


class FPNSeg(nn.Module):
    def __init__(self, width: int, num_classes: int, pyramid: int = 16, seg: int = 8, groups: int = 4) -> None:
        super().__init__()
        self.encoder = _encoder(width)
        chans = [width * 2**k for k in range(4)]
        self.lateral = nn.ModuleList([nn.Conv2d(c, pyramid, 1) for c in chans])
        self.seg_blocks = nn.ModuleList()
        for k in range(4):  # level k (stride 4 * 2**k): max(k, 1) conv-GN-ReLU, upsampling x2 after each but at k=0
            n = max(k, 1)
            blocks = []
            for i in range(n):
                blocks.append(nn.Sequential(
                    nn.Conv2d(pyramid if i == 0 else seg, seg, 3, padding=1, bias=False),
                    nn.GroupNorm(groups, seg), nn.ReLU(inplace=True),
                ))
            self.seg_blocks.append(nn.ModuleList(blocks))
        self.head = nn.Conv2d(seg, num_classes, 1)

    def forward(self, x):
        feats = []
        h = x
        for level in self.encoder:
            h = level(h)
            feats.append(h)
        p = self.lateral[3](feats[3])
        pyramid = [p]
        for k in (2, 1, 0):
            p = F.interpolate(p, scale_factor=2.0, mode="nearest") + self.lateral[k](feats[k])
            pyramid.insert(0, p)
        merged = None
        for k, (p, blocks) in enumerate(zip(pyramid, self.seg_blocks)):
            for block in blocks:
                p = block(p)
                if k > 0:
                    p = F.interpolate(p, scale_factor=2.0, mode="bilinear", align_corners=True)
            merged = p if merged is None else merged + p
        return F.interpolate(self.head(merged), scale_factor=4.0, mode="bilinear", align_corners=True)


def fpn(width: int = 4, size: int = 64, num_classes: int = 5, seed: int = 0) -> nn.Module:
    return _finish(lambda: FPNSeg(width, num_classes), seed, (1, 3, size, size))


# ---------------------------------------------------------------------------------- U-Net


class UNet(nn.Module):
    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        w = width
        self.enc = nn.ModuleList([
            nn.Sequential(_cbr(3, w, stride=2), _cbr(w, w)),  # stride 2
            nn.Sequential(_cbr(w, 2 * w, stride=2), _cbr(2 * w, 2 * w)),  # 4
            nn.Sequential(_cbr(2 * w, 4 * w, stride=2), _cbr(4 * w, 4 * w)),  # 8
            nn.Sequential(_cbr(4 * w, 8 * w, stride=2), _cbr(8 * w, 8 * w)),  # 16
        ])
        self.dec = nn.ModuleList([
            nn.Sequential(_cbr(8 * w + 4 * w, 4 * w), _cbr(4 * w, 4 * w)),  # -> 8
            nn.Sequential(_cbr(4 * w + 2 * w, 2 * w), _cbr(2 * w, 2 * w)),  # -> 4
            nn.Sequential(_cbr(2 * w + w, w), _cbr(w, w)),  # -> 2
            nn.Sequential(_cbr(w, w), _cbr(w, w)),  # -> 1, no skip
        ])
        self.head = nn.Conv2d(w, num_classes, 3, padding=1)

    def forward(self, x):
        skips = []
        h = x
        for level in self.enc:
            h = level(h)
            skips.append(h)
        h = skips.pop()
        for block in self.dec:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            if skips:
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h)
        return self.head(h)


def unet(width: int = 4, size: int = 64, num_classes: int = 5, seed: int = 0) -> nn.Module:
    return _finish(lambda: UNet(width, num_classes), seed, (1, 3, size, size))


# ---------------------------------------------------------------------------------- DBNet


class DBNet(nn.Module):
    def __init__(self, width: int, inner: int = 16) -> None:
        super().__init__()
        self.encoder = _encoder(width, se=True)
        chans = [width * 2**k for k in range(4)]
        self.ins = nn.ModuleList([nn.Conv2d(c, inner, 1, bias=False) for c in chans])
        self.outs = nn.ModuleList([nn.Conv2d(inner, inner // 4, 3, padding=1, bias=False) for _ in chans])
        self.head = nn.Sequential(
            nn.Conv2d(inner, inner // 4, 3, padding=1, bias=False), nn.BatchNorm2d(inner // 4), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(inner // 4, inner // 4, 2, stride=2), nn.BatchNorm2d(inner // 4), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(inner // 4, 1, 2, stride=2),
        )

    def forward(self, x):
        feats = []
        h = x
        for level in self.encoder:
            h = level(h)
            feats.append(h)
        ins = [conv(f) for conv, f in zip(self.ins, feats)]
        out = ins[3]
        tops = [out]
        for k in (2, 1, 0):
            out = ins[k] + F.interpolate(out, size=ins[k].shape[2:], mode="nearest")
            tops.insert(0, out)
        ps = [conv(t) for conv, t in zip(self.outs, tops)]
        size = ps[0].shape[2:]
        fuse = torch.cat([ps[0]] + [F.interpolate(p, size=size, mode="nearest") for p in ps[1:]], dim=1)
        return torch.sigmoid(self.head(fuse))


def dbnet(width: int = 4, size: int = 64, seed: int = 0) -> nn.Module:
    return _finish(lambda: DBNet(width), seed, (1, 3, size, size))


SEGMENTATION = {"fcn8s": fcn8s, "deeplabv3": deeplabv3, "lraspp": lraspp, "fpn": fpn, "unet": unet, "dbnet": dbnet}


def build(name: str, **kwargs) -> nn.Module:
    try:
        return SEGMENTATION[name](**kwargs)
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(SEGMENTATION)}") from None


def export(model: nn.Module, path, exporter: str = "torchscript", dynamic: bool = False) -> Path:
    """Write ``model`` with ``exporter`` ("torchscript" or "dynamo"). ``dynamic``: batch, height
    and width symbolic (as PaddlePaddle exports declare them, -1 / "?"); TorchScript only."""
    from samples.export import EXPORTERS, _example, _quiet

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = _example(model, model.input_shape)
    kwargs: dict = {"external_data": False} if exporter == "dynamo" else {}
    if dynamic:
        if exporter != "torchscript":
            raise ValueError("dynamic=True: TorchScript exporter only")
        kwargs["dynamic_axes"] = {"x": {0: "?", 2: "?h", 3: "?w"}, "maps": {0: "?", 2: "?h", 3: "?w"}}
    names = (["x"], ["maps"]) if dynamic else (["input"], ["output"])
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            model, (x,), str(path), dynamo=exporter == "dynamo", input_names=names[0], output_names=names[1],
            verbose=False, **kwargs,
        )
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m samples.segmentation", description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--models", default=",".join(SEGMENTATION))
    ap.add_argument("--exporters", default="torchscript,dynamo")
    args = ap.parse_args(argv)
    for name in args.models.split(","):
        for exporter in args.exporters.split(","):
            path = export(build(name), args.outdir / f"{name}_{exporter}.onnx", exporter, dynamic=name == "dbnet"
                          and exporter == "torchscript")
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
