"""The command line: what a user sees, exit codes, one-line errors, nothing half written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnx.parser
import pytest

from onnx_dense.cli import main
from tests._cli import run, assert_clean_error
from tests._graphs import TINY_NET, TINY_WEIGHTS, with_weights


def _write(path, text=TINY_NET, seed=0):
    onnx.save(with_weights(text, TINY_WEIGHTS, seed), str(path))
    return str(path)


@pytest.fixture
def net(tmp_path):
    return _write(tmp_path / "net.onnx")


def test_rewrite_verify_inspect(net, tmp_path):
    dst = tmp_path / "dense.onnx"
    code, out, err = run("rewrite", net, dst, "--output-stride", "2")
    assert code == 0, err
    assert "eST 2" in out and "every 2 input pixels" in out and "original: every 4" in out
    code, out, _ = run("verify", net, dst, "--phases")
    assert code == 0 and "PASSED" in out and "phase 1,1" in out
    code, out, _ = run("verify", net, dst, "--json")
    data = json.loads(out)
    assert data["passed"] and {c["check"] for c in data["checks"]} >= {"subgrid", "weights", "any size"}
    code, out, _ = run("inspect", net, "-r", "2")
    assert code == 0 and "MaxPool" in out and "2->1" in out and "1->2" in out
    code, out, _ = run("inspect", net, "--json")
    assert json.loads(out)["reachable_output_strides"] == [[1], [2], [4]]
    code, out, _ = run("inspect", net)
    assert "reachable output strides: 1, 2, 4" in out


def test_from_node_names_the_stride(net, tmp_path):
    src = _write(tmp_path / "named.onnx")
    model = onnx.load(src)
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    onnx.save(model, src)
    code, out, err = run("rewrite", src, tmp_path / "d.onnx", "--from", "n3")
    assert code == 0, err
    assert "a prediction every 2 input pixels" in out
    code, _, err = run("rewrite", src, tmp_path / "e.onnx", "--from", "n1")
    assert_clean_error(code, "", err, "'n1'", "no stride to remove")
    code, _, err = run("rewrite", src, tmp_path / "e.onnx", "--from", "nope")
    assert_clean_error(code, "", err, "'nope'", "no node of that name")
    assert not (tmp_path / "e.onnx").exists()


def test_verify_fails_with_exit_1_on_a_wrong_dilation(net, tmp_path):
    dst = tmp_path / "dense.onnx"
    assert run("rewrite", net, dst, "-r", "1")[0] == 0
    model = onnx.load(str(dst))
    conv = [n for n in model.graph.node if n.op_type == "Conv"][-1]
    for attr in conv.attribute:
        if attr.name == "dilations":
            assert list(attr.ints) == [2, 2]
            attr.ints[:] = [2, 1]
    onnx.save(model, str(dst))
    code, out, _ = run("verify", net, dst)
    assert code == 1
    assert "FAIL  output" in out and "FAILED" in out


@pytest.mark.parametrize(
    "make, needles",
    [
        (lambda d: d / "missing.onnx", ["missing.onnx", "no such file"]),
        (lambda d: d, ["is a directory"]),
        (lambda d: _touch(d / "empty.onnx", b""), ["empty file"]),
        (lambda d: _touch(d / "junk.onnx", b"\x08\x96\x01garbage\xff\xfe not protobuf"), ["not an ONNX model"]),
        (lambda d: _touch(d / "text.onnx", b'{"json": true}\n'), ["not an ONNX model"]),
    ],
    ids=["missing", "directory", "empty", "corrupt", "not-onnx"],
)
def test_bad_files(tmp_path, make, needles):
    src = make(tmp_path)
    dst = tmp_path / "out.onnx"
    code, out, err = run("rewrite", src, dst, "-r", "2")
    assert_clean_error(code, out, err, *needles)
    assert not dst.exists()
    code, out, err = run("inspect", src)
    assert_clean_error(code, out, err, *needles)


def _touch(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "args, needles",
    [
        (["-r", "3"], ["output stride 3 is not reachable", "reachable output strides: 1, 2, 4"]),
        (["-r", "0"], ["positive integer"]),
        (["-r", "two"], ["'two'"]),
        ([], ["give --output-stride R", "1, 2, 4"]),
        (["-r", "2", "--from", "x"], ["not both"]),
        (["-r", "2", "--input-shape", "nope:1,3,32,32"], ["'nope'", "inputs: input"]),
        (["-r", "2", "--input-shape", "input:1,3,32"], ["rank 3"]),
        (["-r", "2", "--input-shape", "garbage"], ["NAME:D0,D1"]),
        (["-r", "2", "--outputs", "w1"], ["'w1'", "weight"]),
        (["-r", "2", "--outputs", "zz"], ["'zz'", "no tensor of that name"]),
        (["-r", "2x2x2"], ["3 values", "2 spatial axes"]),
    ],
)
def test_bad_options(net, tmp_path, args, needles):
    dst = tmp_path / "out.onnx"
    code, out, err = run("rewrite", net, dst, *args)
    assert_clean_error(code, out, err, *needles)
    assert not dst.exists()


def test_usage_errors_are_one_line(net, tmp_path):
    code, out, err = run("rewrite", net)
    assert_clean_error(code, out, err, "Missing argument 'OUT'", "see 'onnx-dense rewrite --help'")
    code, out, err = run("rewrite", net, tmp_path / "o.onnx", "--bogus")
    assert_clean_error(code, out, err, "--bogus")
    code, out, err = run("nosuchcommand")
    assert_clean_error(code, out, err, "nosuchcommand")
    code, out, err = run("bench", net, net, "--provider", "tpu")
    assert_clean_error(code, out, err, "'tpu'")
    code, out, _ = run("rewrite", "--help")
    assert code == 0 and "rewrite [OPTIONS] IN OUT" in out
    assert not (tmp_path / "o.onnx").exists()


def test_dynamic_input_needs_a_shape(tmp_path):
    src = _write(tmp_path / "dyn.onnx", TINY_NET.replace("float[1,3,32,32] input", "float[N,3,H,W] input").replace(
        "float[1,4,8,8] output", "float[N,4,h,w] output"))
    code, out, err = run("rewrite", src, tmp_path / "o.onnx", "-r", "2")
    assert_clean_error(code, out, err, "'input'", "--input-shape input:1,3,H,W", "size it runs at")
    code, out, err = run("rewrite", src, tmp_path / "o.onnx", "-r", "2", "--input-shape", "input:1,3,40,40")
    assert code == 0, err
    code, out, err = run("verify", src, tmp_path / "o.onnx", "--phases")
    assert code == 0, out


def test_unknown_op_names_the_node(tmp_path):
    text = TINY_NET.replace("output = Relu (c2)", "output = custom.Swirl (c2)").replace(
        '"" : 20', '"" : 20, "custom" : 1')
    src = _write(tmp_path / "custom.onnx", text)
    model = onnx.load(src)
    model.graph.node[-1].name = "swirl_1"
    onnx.save(model, src)
    code, out, err = run("rewrite", src, tmp_path / "o.onnx", "-r", "1")
    assert_clean_error(code, out, err, "'swirl_1'", "custom.Swirl", "--outputs")


def test_refuses_to_overwrite_input_and_never_modifies_it(net, tmp_path):
    before = open(net, "rb").read()
    stamp = os.stat(net).st_mtime_ns
    code, out, err = run("rewrite", net, net, "-r", "2")
    assert_clean_error(code, out, err, "refusing to overwrite the input model")
    code, out, err = run("rewrite", net, tmp_path / "nodir" / "o.onnx", "-r", "2")
    assert_clean_error(code, out, err, "does not exist")
    assert run("rewrite", net, tmp_path / "ok.onnx", "-r", "2")[0] == 0
    assert open(net, "rb").read() == before and os.stat(net).st_mtime_ns == stamp


def test_failed_write_leaves_nothing_behind(net, tmp_path, monkeypatch):
    from onnx_dense import model_io

    real_write = model_io._write_initializer
    calls = []

    def disk_full_midway(f, value):
        calls.append(value.name)
        if len(calls) == 2:  # the graph and one weight are already on disk
            raise OSError(28, "No space left on device")
        real_write(f, value)

    monkeypatch.setattr(model_io, "_write_initializer", disk_full_midway)
    code, out, err = run("rewrite", net, tmp_path / "o.onnx", "-r", "2")
    assert_clean_error(code, out, err, "could not write the model", "No space left")
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]


def test_verify_bad_inputs(net, tmp_path):
    dst = tmp_path / "dense.onnx"
    run("rewrite", net, dst, "-r", "2")
    code, out, err = run("verify", net, net)
    assert_clean_error(code, out, err, "no onnx_dense metadata")
    code, out, err = run("verify", net, dst, "--inputs", tmp_path / "none.npz")
    assert_clean_error(code, out, err, "none.npz")
    np.savez(tmp_path / "wrong.npz", other=np.zeros((1, 3, 32, 32), np.float32))
    code, out, err = run("verify", net, dst, "--inputs", tmp_path / "wrong.npz")
    assert_clean_error(code, out, err, "input")
    np.savez(tmp_path / "good.npz", input=np.ones((1, 3, 32, 32), np.float32))
    assert run("verify", net, dst, "--inputs", tmp_path / "good.npz")[0] == 0


def test_internal_error_is_one_line_with_exit_3(net, tmp_path, monkeypatch):
    from onnx_dense import api

    def boom(*a, **k):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(api, "rewrite", boom)
    code, out, err = run("rewrite", net, tmp_path / "o.onnx", "-r", "2")
    assert code == 3 and "internal error: ZeroDivisionError: oops" in err and "Traceback" not in err


def test_console_script_in_a_subprocess(net, tmp_path):
    """The real entry point, as a user's shell runs it: no traceback, exit 2, nothing written."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from onnx_dense.cli import main; sys.exit(main())",
         "rewrite", str(tmp_path / "nope.onnx"), str(tmp_path / "o.onnx"), "-r", "2"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr
    assert main(["--version"]) == 0
