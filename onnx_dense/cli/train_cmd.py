"""``onnx-dense train DENSE --task T --data DIR``: fine-tune a dense model in PyTorch.

PyTorch is imported only when the command runs; without it the command says how to install
it in one line (exit 2).
"""

from __future__ import annotations

import click

from onnx_dense.cli import options
from onnx_dense.cli.progress import is_terminal
from onnx_dense.errors import DenseError

TASKS = ("segmentation", "classification", "regression")


def _floats(text: str | None, what: str):
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise DenseError(f"--{what} '{text}': expected numbers separated by commas, e.g. 0.485,0.456,0.406") from None


@click.command("train")
@click.argument("dense", type=options.model_path)
@click.option("--task", type=click.Choice(TASKS), required=True, help="what the labels are")
@click.option("--data", "data", required=True, metavar="DIR|FILE.npz",
              help="a folder (images/ + labels/ PNGs or labels.csv) or an .npz with 'images' and 'labels'")
@click.option("--epochs", default=1, show_default=True, help="passes over the data (unless --steps)")
@click.option("--steps", type=int, default=None, help="optimiser steps in total (overrides --epochs)")
@click.option("--lr", default=1e-3, show_default=True, help="learning rate")
@click.option("--batch-size", "-b", default=8, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default="sgd", show_default=True)
@click.option("--momentum", default=0.9, show_default=True, help="SGD momentum")
@click.option("--weight-decay", default=0.0, show_default=True)
@click.option("--schedule", type=click.Choice(["constant", "cosine", "poly"]), default="constant", show_default=True,
              help="learning-rate schedule over the run")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda, cuda:N")
@click.option("--checkpoint-dir", default="checkpoints", show_default=True, type=click.Path(file_okay=False, path_type=str),
              help="where checkpoints go (last.pt at the end)")
@click.option("--checkpoint-every", type=int, default=None, help="also write step-NNNNNN.pt every N steps")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="also write the trained dense ONNX model here")
@click.option("--train-bn", is_flag=True, help="train BatchNorm (batch statistics); default: kept in inference mode")
@click.option("--label-mode", type=click.Choice(["sample", "upsample"]), default="sample", show_default=True,
              help="segmentation: labels sampled at each prediction's pixel, or scores upsampled to the label size")
@click.option("--ignore-index", default=255, show_default=True, help="segmentation label value that is not scored")
@click.option("--loss-output", "output", metavar="NAME", default=None,
              help="the model output the loss is computed on (default: the first)")
@click.option("--output", "old_output", default=None, hidden=True)  # deprecated name of --loss-output
@click.option("--mean", default=None, metavar="M1,M2,M3", help="per-channel mean subtracted from the images")
@click.option("--std", default=None, metavar="S1,S2,S3", help="per-channel std the images are divided by")
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", default=0, show_default=True, help="data-loading worker processes")
@click.option("--resume", type=click.Path(dir_okay=False, path_type=str), default=None, help="continue from a checkpoint")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar, no summary")
def train(dense, task, data, epochs, steps, lr, batch_size, optimizer, momentum, weight_decay, schedule, device,
          checkpoint_dir, checkpoint_every, out, train_bn, label_mode, ignore_index, output, old_output, mean, std, seed,
          workers, resume, quiet) -> None:
    """Fine-tune the dense model DENSE (from `onnx-dense rewrite`) on labelled data.

    \b
    segmentation    per-pixel cross-entropy on the dense grid
    classification  cross-entropy of the dense logits averaged over every position
    regression      L1 between tanh(averaged output) and targets in [-1, 1]

    Writes CHECKPOINT_DIR/last.pt (the ONNX-named weights); `onnx-dense export-dpoa` puts them
    back into the original model, --out writes the trained dense model. The progress bar
    shows only when stderr is a terminal; the summary line is printed either way.

    \b
    Example:
      onnx-dense rewrite model.onnx dense.onnx -r 8
      onnx-dense train dense.onnx --task classification --data data/ --epochs 10 --out trained.onnx
      onnx-dense export-dpoa model.onnx checkpoints/last.pt model_dpoa.onnx
    """
    if old_output is not None:
        if output is not None and output != old_output:
            raise DenseError("--output is the old name of --loss-output; give only --loss-output")
        click.echo("onnx-dense: warning: --output is deprecated, use --loss-output (the same meaning)", err=True)
        output = old_output
    try:
        import torch  # noqa: F401
    except ImportError:
        raise DenseError('onnx-dense train needs PyTorch: pip install "onnx-dense[torch]"') from None
    from onnx_dense.train.trainer import train as run_train

    result = run_train(
        dense, task=task, data=data, epochs=epochs, steps=steps, lr=lr, batch_size=batch_size, optimizer=optimizer,
        momentum=momentum, weight_decay=weight_decay, schedule=schedule, device=device, checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every, train_bn=train_bn, label_mode=label_mode, ignore_index=ignore_index,
        output=output, mean=_floats(mean, "mean"), std=_floats(std, "std"), seed=seed, num_workers=workers,
        resume=resume, out=out, progress=not quiet and is_terminal(),
    )
    if quiet:
        return
    click.echo(
        f"trained {result.steps} steps ({result.epochs:.2f} epochs) in {result.seconds:.1f} s on {result.device}, "
        f"{result.images_per_second:.1f} images/s; loss {result.final_loss:.4f} (mean of the last steps)"
    )
    if result.checkpoint is not None:
        click.echo(f"  checkpoint: {result.checkpoint}")
    if result.onnx_out is not None:
        click.echo(f"  trained dense model: {result.onnx_out}")
