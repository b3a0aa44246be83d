"""The ``onnx-dense`` command: one module per subcommand, one error convention for all.

Exit codes: 0 success; 1 ``verify`` found a difference; 2 bad input (a missing or corrupt
file, a bad option, a model the rewrite cannot make dense), printed as one line on stderr
with no traceback; 3 an internal error (a bug in onnx-dense: set ONNX_DENSE_DEBUG=1 for the
traceback and please report it).
"""

from __future__ import annotations

import os
import sys

import click

from onnx_dense import __version__
from onnx_dense.cli import bench_cmd, dpoa_cmd, inspect_cmd, rewrite_cmd, run_cmd, train_cmd, verify_cmd
from onnx_dense.errors import DenseError

INTERNAL_ERROR = 3
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class DenseGroup(click.Group):
    """Turns DenseError, click's usage errors and any unexpected exception into one line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        # click's own usage errors print a usage block and a blank line: four lines, not one
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except _NO_ARGS_IS_HELP as exc:  # bare `onnx-dense` (click >= 8.2): the help, as click prints it
            click.echo(exc.ctx.get_help(), err=True)
            code = exc.exit_code
        except click.ClickException as exc:
            text = " ".join(exc.format_message().split())
            if isinstance(exc, click.UsageError):
                ctx = exc.ctx
                command = "onnx-dense" + (f" {ctx.info_name}" if ctx is not None and ctx.parent is not None else "")
                text += f" (see '{command} --help')"
            click.echo(f"onnx-dense: error: {text}", err=True)
            code = exc.exit_code
        except click.Abort:
            click.echo("Aborted!", err=True)
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DenseError as exc:
            click.echo(f"onnx-dense: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
            raise
        except MemoryError:
            click.echo("onnx-dense: error: out of memory", err=True)
            ctx.exit(INTERNAL_ERROR)
        except Exception as exc:  # a bug in onnx-dense, not the user's fault
            if os.environ.get("ONNX_DENSE_DEBUG"):
                raise
            text = (str(exc).strip().splitlines() or [""])[0][:300]
            click.echo(
                f"onnx-dense: internal error: {type(exc).__name__}: {text} "
                "(a bug in onnx-dense; rerun with ONNX_DENSE_DEBUG=1 for the traceback and report it)",
                err=True,
            )
            ctx.exit(INTERNAL_ERROR)


@click.group(cls=DenseGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="onnx-dense")
def cli() -> None:
    """Dense (eConv/ePool) equivalents of CNNs exported to ONNX.

    \b
    onnx-dense rewrite model.onnx dense.onnx --output-stride 8
    onnx-dense verify  model.onnx dense.onnx --phases
    onnx-dense inspect model.onnx --output-stride 8
    onnx-dense run     dense.onnx image.jpg --out maps/
    onnx-dense bench   model.onnx dense.onnx
    onnx-dense train   dense.onnx --task segmentation --data DIR --out trained.onnx
    onnx-dense export-dpoa model.onnx trained.onnx model_dpoa.onnx
    """


cli.add_command(rewrite_cmd.rewrite)
cli.add_command(verify_cmd.verify)
cli.add_command(inspect_cmd.inspect)
cli.add_command(bench_cmd.bench)
cli.add_command(train_cmd.train)
cli.add_command(dpoa_cmd.export_dpoa)
cli.add_command(run_cmd.run)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code instead of raising SystemExit when called."""
    try:
        cli.main(args=argv, prog_name="onnx-dense", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
