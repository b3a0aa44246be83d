"""Write the sample CNNs of :mod:`samples.zoo` as ONNX files.

    python -m samples.make_samples OUTDIR [--exporter torchscript|dynamo]
                                   [--models vgg,fcn,...] [--opset N]
                                   [--dynamic-batch] [--keep-batchnorm] [--seed S]
                                   [--no-data]

writes ``OUTDIR/<name>.onnx`` for each model (default: the small core zoo)
and prints one line per model; then (unless --no-data) two pictures,
``OUTDIR/scene.jpg`` and ``OUTDIR/shapes.png``, and a small labelled folder,
``OUTDIR/data/`` (:mod:`samples.sample_images`).  Weights are random (seeded); no download.
Known names: the core zoo (vgg, fcn, resnet, mobilenetv2, inception,
alexnet, conv1d), variants (resnet_bottleneck, inception_3x3, alexnet_lrn),
the real-size benchmark nets (vgg16, resnet50; slow, hundreds of MB) and
the global-context nets of :mod:`samples.zoo_context` (mobilenetv3 with SE
blocks, mobilenetv3_fcn, unet, unet_bilinear).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from samples import zoo, zoo_context
from samples.export import EXPORTERS, export_onnx


KNOWN = [*zoo.ALL_MODELS, *zoo_context.CONTEXT_ZOO]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m samples.make_samples", description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path, help="directory to write <name>.onnx into")
    ap.add_argument("--exporter", choices=EXPORTERS, default="torchscript")
    ap.add_argument(
        "--models",
        default=",".join(zoo.ZOO),
        help=f"comma-separated model names (default: all of the core zoo); known: {', '.join(KNOWN)}",
    )
    ap.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's, 20)")
    ap.add_argument("--dynamic-batch", action="store_true", help="symbolic batch dimension named 'batch'")
    ap.add_argument("--keep-batchnorm", action="store_true", help="keep BatchNormalization nodes (not folded)")
    ap.add_argument("--seed", type=int, default=0, help="weight seed")
    ap.add_argument("--no-data", action="store_true", help="write only the models, not the sample images and data/")
    args = ap.parse_args(argv)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(KNOWN)}")

    args.outdir.mkdir(parents=True, exist_ok=True)
    for name in names:
        t0 = time.perf_counter()
        if name in zoo_context.CONTEXT_ZOO:  # their own exporter names every output
            model = zoo_context.build(name, seed=args.seed)
            path = zoo_context.export(model, args.outdir / f"{name}.onnx", exporter=args.exporter)
        else:
            model = zoo.build(name, seed=args.seed)
            path = export_onnx(
                model,
                model.input_shape,
                args.outdir / f"{name}.onnx",
                exporter=args.exporter,
                opset=args.opset,
                dynamic_batch=args.dynamic_batch,
                keep_batchnorm=args.keep_batchnorm,
            )
        n_params = sum(p.numel() for p in model.parameters())
        shape = "x".join(map(str, model.input_shape))
        print(
            f"{name:<18} {path}  input {shape}  {n_params:,} params  "
            f"{args.exporter} {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
    if not args.no_data:
        from samples.sample_images import write_sample_data

        files = write_sample_data(args.outdir, seed=args.seed)
        print(f"{'images':<18} {args.outdir / 'scene.jpg'}, {args.outdir / 'shapes.png'}, {args.outdir / 'data'}/ "
              f"({len(files)} files: images/, labels/, labels.csv, classes.txt)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
