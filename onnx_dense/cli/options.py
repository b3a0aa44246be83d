"""Options shared by several subcommands, parsed into what the Python API takes."""

from __future__ import annotations

import click

from onnx_dense.errors import DenseError
from onnx_dense.passes.static_shapes import parse_input_shape


def parse_stride(text: str | None):
    """'8' -> 8, '8x4' or '8,4' -> (8, 4)."""
    if text is None:
        return None
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise DenseError(f"--output-stride '{text}': expected a positive integer, or one per spatial axis such as 8x4")
    return values[0] if len(values) == 1 else values


def parse_shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for text in values:
        name, dims = parse_input_shape(text)
        if name in shapes:
            raise DenseError(f"--input-shape names '{name}' twice")
        shapes[name] = dims
    return shapes


def parse_names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise DenseError("--outputs: give at least one tensor name, e.g. --outputs feat1,feat2")
    return names


model_path = click.Path(dir_okay=True, path_type=str)

output_stride = click.option(
    "--output-stride", "-r", "output_stride", metavar="R",
    help="input pixels between neighbouring dense predictions (one value, or one per axis: 8x4); "
    "rewrite needs this or --from",
)
from_node = click.option(
    "--from", "from_node", metavar="NODE",
    help="instead of -r: the paper's 'set the stride of NODE to 1' (its input's stride becomes the output stride)",
)
input_shape = click.option(
    "--input-shape", "input_shapes", metavar="NAME:D0,D1,...", multiple=True,
    help="static size of a graph input for the analysis, e.g. input:1,3,224,224 (repeatable)",
)
outputs = click.option(
    "--outputs", "outputs", metavar="T1,T2",
    help="cut the graph at these tensors first (they become the outputs)",
)
