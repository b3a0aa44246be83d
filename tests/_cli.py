"""Running the command line in-process, and what every bad-input answer must look like."""

from __future__ import annotations

from click.testing import CliRunner

from onnx_dense.cli import cli


def run(*args):
    """(exit code, stdout, stderr) of ``onnx-dense ARGS``."""
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def assert_clean_error(code, out, err, *needles):
    """Exit 2, one line on stderr starting 'onnx-dense: error: ', no traceback, naming ``needles``."""
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onnx-dense: error: ")
    assert "Traceback" not in err + out
    for needle in needles:
        assert needle in lines[0], lines[0]
