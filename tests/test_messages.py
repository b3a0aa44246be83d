"""What a newcomer reads: messages that say what to do, help with an example, quiet logs.

Each test is the situation from issue 17 and the line the user now gets.
"""

from __future__ import annotations

import zipfile

import pytest

from onnx_dense.cli import cli
from onnx_dense.cli.progress import status_line
from tests._cli import assert_clean_error, run
from tests.test_cli import _write

COMMANDS = ["rewrite", "verify", "inspect", "run", "bench", "train", "export-dpoa"]


@pytest.fixture
def pair(tmp_path):
    net = _write(tmp_path / "net.onnx")
    dense = str(tmp_path / "dense.onnx")
    assert run("rewrite", net, dense, "-r", "2")[0] == 0
    return net, dense


@pytest.mark.parametrize("command", ["verify", "bench"])
def test_swapped_arguments_name_both_files_and_the_order(pair, command):
    net, dense = pair
    code, out, err = run(command, dense, net)
    assert_clean_error(code, out, err, net, dense, "swapped", f"onnx-dense {command} {net} {dense}")


def test_a_model_that_is_not_dense_says_which_argument(pair):
    net, _ = pair
    code, out, err = run("verify", net, net)
    assert_clean_error(code, out, err, f"{net} has no onnx_dense metadata", "ORIGINAL DENSE")


def _checkpoint(path):
    """What torch.save writes (a zip archive), without needing torch."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    return str(path)


@pytest.mark.parametrize("command", ["rewrite", "verify", "inspect"])
def test_a_checkpoint_given_as_a_model_is_named_as_one(pair, tmp_path, command):
    net, dense = pair
    ckpt = _checkpoint(tmp_path / "last.pt")
    args = {"rewrite": [ckpt, tmp_path / "o.onnx", "-r", "2"], "verify": [ckpt, dense], "inspect": [ckpt]}[command]
    code, out, err = run(command, *args)
    assert_clean_error(code, out, err, ckpt, "PyTorch checkpoint", "export-dpoa")
    assert "protobuf" not in err


def test_an_image_given_as_a_model(tmp_path):
    picture = tmp_path / "street.jpg"
    picture.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 64)
    assert_clean_error(*run("inspect", picture), "a JPEG image, not an ONNX model")


def test_an_unreachable_stride_says_why(pair, tmp_path):
    net, _ = pair
    code, out, err = run("rewrite", net, tmp_path / "x.onnx", "-r", "3")
    assert_clean_error(code, out, err, "output stride 3 is not reachable: the original predicts every",
                       "strided layers", "reachable output strides: 1, 2")
    assert "dense grid ends" not in err


def test_verify_counts_a_skipped_check_apart(tmp_path):
    from tests.test_run_cmd import CLS

    import numpy as np
    import onnx
    import onnx.parser

    model = onnx.parser.parse_model(CLS)
    rng = np.random.default_rng(0)
    for name, shape in {"w1": (4, 3, 3, 3), "wf": (3, 256), "bf": (3,)}.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    onnx.save(model, str(tmp_path / "cls.onnx"))
    assert run("rewrite", tmp_path / "cls.onnx", tmp_path / "d.onnx", "-r", "1")[0] == 0
    code, out, err = run("verify", tmp_path / "cls.onnx", tmp_path / "d.onnx", "--phases")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert any(line.startswith("SKIP ") and "classifier head" in line for line in lines), out
    assert lines[-1].startswith("PASSED: 3 of 3 checks passed; 1 SKIPPED"), lines[-1]


def test_bench_border_line_does_not_read_as_a_failure(pair):
    net, dense = pair
    code, out, err = run("bench", net, dense, "--repeat", "1", "--settle", "0")
    assert code == 0, err
    stitch = next(line for line in out.splitlines() if "shift-and-stitch  max abs" in line)
    assert stitch.startswith("PASS") and "not compared" not in stitch and "max abs" not in stitch.split("(")[-1]
    if "left out" in stitch:
        assert "border positions left out: padding differs there by design" in stitch
    assert "round" not in err  # not a terminal: no progress lines


def test_status_line_writes_only_to_a_terminal():
    class Stream:
        def __init__(self, tty):
            self.tty, self.text = tty, ""

        def isatty(self):
            return self.tty

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    log, term = Stream(False), Stream(True)
    for stream in (log, term):
        say = status_line(stream)
        for r in range(20):
            say(f"round {r + 1} of 20")
        say(None)
    assert log.text == ""
    assert "round 20 of 20" in term.text and "\n" not in term.text  # one line, rewritten in place


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_help_has_an_example(command):
    code, out, _ = run(command, "--help")
    assert code == 0
    assert "Example:" in out and f"onnx-dense {command} " in out.split("Example:")[1]


def test_rewrite_help_names_in_out_and_what_is_required():
    out = run("rewrite", "--help")[1]
    assert "rewrite [OPTIONS] IN OUT" in " ".join(out.split())
    assert "one of the two is required" in out and "SRC" not in out and "DST" not in out


def test_train_loss_output_and_its_old_name():
    out = run("train", "--help")[1]
    assert "--loss-output NAME" in out and "--out " in out and "--output " not in out  # the old name is hidden
    params = {p.name: p for p in cli.commands["train"].params}
    assert params["old_output"].hidden and params["old_output"].opts == ["--output"]


def test_train_output_is_a_deprecated_alias(pair, tmp_path):
    pytest.importorskip("torch")
    _, dense = pair
    code, out, err = run("train", dense, "--task", "segmentation", "--data", tmp_path / "none", "--output", "y",
                         "--loss-output", "z")
    assert_clean_error(code, out, err, "--output is the old name of --loss-output")
