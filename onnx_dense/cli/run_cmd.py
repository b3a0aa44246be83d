"""``onnx-dense run DENSE IMAGE... --out DIR``: dense maps of images, as .npy and as pictures."""

from __future__ import annotations

import sys

import click

from onnx_dense.cli import options
from onnx_dense.errors import DenseError


@click.command("run")
@click.argument("model", type=options.model_path)
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=str), metavar="DIR",
              help="folder for <image>.<output>.npy, .png and <image>.json (created if missing)")
@click.option("--size", metavar="N|HxW", help="resize: N for the shorter side, HxW for an exact size (default: as is)")
@click.option("--mean", default="0", show_default=True, metavar="M[,M,M]",
              help="subtracted per channel after scaling pixels to [0, 1] (ImageNet: 0.485,0.456,0.406)")
@click.option("--std", default="1", show_default=True, metavar="S[,S,S]",
              help="divided per channel after --mean (ImageNet: 0.229,0.224,0.225)")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="auto: CUDA when the installed onnxruntime has it, else CPU")
@click.option("--tile", metavar="N|HxW",
              help="run tiles of N input pixels (overlap included) and stitch them: same output, less memory "
                   "(a .npy image is then read by windows and its outputs stitched on disk)")
@click.option("--max-memory", metavar="SIZE",
              help="memory budget for the whole process, e.g. 2GB: runs whole, phase by phase (its trunk on tiles if "
                   "need be), or phase by phase on tiles, whichever is fastest within it (one line per image says which); "
                   "with --engine ray, each worker's budget")
@click.option("--schedule", type=click.Choice(["auto", "whole", "phases", "tiled-trunk", "phases+tiles", "tiles"]), default="auto",
              show_default=True, help="force a schedule instead of choosing one from --max-memory")
@click.option("--fp16", is_flag=True, help="run in float16 (inputs and outputs stay float32; not bit-exact)")
@click.option("--nhwc", is_flag=True, help="CUDA: prefer channels-last convolution kernels (prefer_nhwc)")
@click.option("--allow-cpu-nodes", is_flag=True,
              help="CUDA: accept nodes that onnxruntime would run on the CPU instead of failing")
@click.option("--view", type=click.Choice(["auto", "labels", "heatmap", "none"]), default="auto", show_default=True,
              help="the PNG: argmax label map, top-class heatmap over the image, or none (auto: heatmap for "
                   "classifiers and single-channel outputs, labels otherwise)")
@click.option("--classes", "class_names", metavar="A,B,...|FILE",
              help="class names for the pictures' legends: comma-separated, or a text file with one per line")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar and no summary")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: run on Ray workers (pip install 'onnx-dense[ray]'); reruns skip images already done")
@click.option("--address", metavar="HOST:PORT", help="ray: the cluster to use (default: start a local Ray)")
@click.option("--workers", type=int, metavar="N", help="ray: workers, one onnxruntime session each (default: one per CPU)")
@click.option("--cpus-per-worker", type=int, default=1, show_default=True, metavar="N", help="ray: CPUs (threads) per worker")
def run(model, images, out_dir, size, mean, std, provider, tile, max_memory, schedule, fp16, nhwc, allow_cpu_nodes, view,
        class_names, quiet, engine, address, workers, cpus_per_worker) -> None:
    """Run the dense MODEL on each IMAGE and write its dense maps to --out.

    Per image and output: <stem>.<output>.npy (the raw map), <stem>.<output>.png (a picture at
    the size fed to the model) and <stem>.json (sizes and the grid that puts each prediction on
    the input pixel at the centre of its receptive field); for label maps also
    <stem>.<output>.labels.png, whose pixel values are the classes. An image that cannot be
    read gets one error line and the others still run; the exit code is then 2.

    \b
    Example:
      onnx-dense run dense.onnx street.jpg field.png --out maps/ --classes background,person,car
    """
    from tqdm import tqdm

    from onnx_dense.runtime.batch import run_images
    from onnx_dense.runtime.dense_session import DenseSession
    from onnx_dense.runtime.images import parse_floats, parse_size

    if engine == "ray":
        from onnx_dense.runtime import ray_engine

        ray_engine.import_ray()  # not installed: one line saying how, before anything else
    elif address or workers or cpus_per_worker != 1:
        raise DenseError("--address, --workers and --cpus-per-worker are options of --engine ray")
    size_v = parse_size(size)
    mean_v, std_v = parse_floats(mean, "--mean"), parse_floats(std, "--std")
    session = None if engine == "ray" else DenseSession(
        model, provider=provider, fp16=fp16, nhwc=nhwc, allow_cpu_nodes=allow_cpu_nodes,
        fixed_shapes=isinstance(size_v, tuple) and tile is None, tile=tile, max_memory=max_memory, schedule=schedule,
    )
    bar = tqdm(total=len(images), unit="image", file=sys.stderr, disable=True if quiet else None, leave=False)

    def error(image: str, message: str, advance: float = 1) -> None:
        line = f"onnx-dense: error: {message}"
        if bar.disable:
            click.echo(line, err=True)
        else:
            tqdm.write(line, file=sys.stderr)
        bar.update(advance)

    def done(result, advance: float = 1) -> None:
        if result.schedule and not quiet and (max_memory or schedule != "auto"):
            tqdm.write(f"onnx-dense: {result.image}: {result.schedule}", file=sys.stderr)
        bar.update(advance)

    try:
        if session is None:
            if tile:  # progress comes in tiles: fractions of an image
                bar.bar_format = "{l_bar}{bar}| {n:.1f}/{total} {unit}s [{elapsed}<{remaining}]"
            summary = ray_engine.run_images(
                model, images, out_dir, size=size_v, mean=mean_v, std=std_v, provider=provider, tile=tile, fp16=fp16,
                nhwc=nhwc, allow_cpu_nodes=allow_cpu_nodes, view=view, class_names=class_names, address=address,
                workers=workers, max_memory=max_memory, schedule=schedule,
                cpus_per_worker=cpus_per_worker, on_error=lambda i, m: error(i, m, 0),
                on_skip=lambda _image: bar.update(1), on_progress=bar.update, on_done=lambda r: done(r, 0),
            )
        else:
            summary = run_images(
                model, images, out_dir, size=size_v, mean=mean_v, std=std_v, view=view, class_names=class_names,
                session=session, on_error=error, on_done=done,
            )
    finally:
        bar.close()
        if session is not None:
            session.close()
    if not quiet:
        n = len(summary.written)
        failed = f", {len(summary.failed)} failed" if summary.failed else ""
        skipped = f", {len(summary.skipped)} done before" if summary.skipped else ""
        click.echo(f"wrote {n} of {len(images)} image{'s' if len(images) != 1 else ''} to {out_dir} "
                   f"({summary.provider}{', tiled' if tile else ''}){failed}{skipped}")
    if summary.failed:
        raise click.exceptions.Exit(DenseError.exit_code)
