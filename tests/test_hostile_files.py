"""Files and graphs that cannot hurt (issue 16): symlinks at output paths, names that collide,
external data outside the model's folder, models that cannot run, and the answers that were
not one line or not exit 2. Each case runs the command line in-process (``tests/_cli.py``);
where the exact stderr or the exit code of a real process matters, also in a subprocess.

The fuzz test at the end (``test_hostile_files_fuzz``) builds seeded random hostile layouts
and checks every file-taking subcommand against the same rules: exit 2, one line, nothing
written, nothing outside the output folder touched, inputs byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import pytest
from PIL import Image

from tests._cli import assert_clean_error, run
from tests._graphs import TINY_NET, TINY_WEIGHTS, with_weights


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _tiny(path, *, external=False, text=TINY_NET, seed=0, edit=None):
    model = with_weights(text, TINY_WEIGHTS, seed)
    if edit is not None:
        edit(model)
    path = Path(path)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def snapshot(*roots) -> dict[str, tuple]:
    """Every entry under ``roots`` (links not followed): link target, or size, mtime and hash."""
    seen = {}
    for root in roots:
        for folder, dirs, files in os.walk(root, followlinks=False):
            for name in dirs + files:
                p = os.path.join(folder, name)
                if os.path.islink(p):
                    seen[p] = ("link", os.readlink(p))
                elif os.path.isfile(p):
                    st = os.stat(p)
                    seen[p] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(Path(p).read_bytes()).hexdigest())
                else:
                    seen[p] = ("dir",)
    return seen


def _subprocess(*args, prelude=""):
    code = f"import sys\n{prelude}\nfrom onnx_dense.cli import main\nsys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "default"}, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def world(tmp_path):
    """A work folder with a model (single file and external data) and a decoy folder outside it."""
    work = tmp_path / "work"
    decoy = tmp_path / "decoy"
    work.mkdir()
    decoy.mkdir()
    (decoy / "precious.bin").write_bytes(b"do not touch" * 10)
    _tiny(work / "m.onnx")
    _tiny(work / "mx.onnx", external=True)
    return work, decoy


def _dense(work, src="m.onnx", name="d.onnx", stride="2"):
    code, out, err = run("rewrite", work / src, work / name, "-r", stride)
    assert code == 0, err
    return work / name


# --------------------------------------------------------------------------------------------
# writes through a symlink
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("src", ["m.onnx", "mx.onnx"])
@pytest.mark.parametrize("link", ["d.onnx", "d.onnx.data"])
@pytest.mark.parametrize("dangling", [False, True])
def test_a_symlink_at_an_output_path_is_refused(world, src, link, dangling):
    work, decoy = world
    target = decoy / ("nothing-yet.bin" if dangling else "precious.bin")
    os.symlink(target, work / link)
    before, decoy_before = snapshot(work.parent), snapshot(decoy)
    code, out, err = run("rewrite", work / src, work / "d.onnx", "-r", "2")
    if link == "d.onnx.data" and src == "m.onnx":
        # a single-file output writes no data file: the link is not an output path here
        assert code == 0, err
        assert os.path.islink(work / link) and not (decoy / "nothing-yet.bin").exists()
        assert snapshot(decoy) == decoy_before
        return
    assert_clean_error(code, out, err, link, "symbolic link")
    assert snapshot(work.parent) == before


def test_a_symlink_at_an_output_path_of_export_dpoa_and_run_is_refused(world, tmp_path):
    work, decoy = world
    dense = _dense(work)
    os.symlink(decoy / "precious.bin", work / "o.onnx")
    before = snapshot(work.parent)
    code, out, err = run("export-dpoa", work / "m.onnx", dense, work / "o.onnx")
    assert_clean_error(code, out, err, "o.onnx", "symbolic link")
    maps = work / "maps"
    maps.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(work / "img.png")
    os.symlink(decoy / "precious.bin", maps / "img.json")
    before = snapshot(work.parent)
    code, out, err = run("run", dense, work / "img.png", "--out", maps, "-q")
    assert_clean_error(code, out, err, "img.json", "symbolic link")
    assert snapshot(work.parent) == before  # nothing of that image written, not even its .npy


# --------------------------------------------------------------------------------------------
# name collisions between inputs, outputs and data files
# --------------------------------------------------------------------------------------------


def test_input_named_like_the_outputs_data_file_is_refused(world):
    work, _ = world
    shutil.copy(work / "mx.onnx", work / "d.onnx.data")  # its weights stay in mx.onnx.data
    before = snapshot(work.parent)
    code, out, err = run("rewrite", work / "d.onnx.data", work / "d.onnx", "-r", "2")
    assert_clean_error(code, out, err, "d.onnx.data", "input")
    assert snapshot(work.parent) == before


def test_output_named_like_the_inputs_data_file_is_refused(world):
    work, _ = world
    before = snapshot(work.parent)
    code, out, err = run("rewrite", work / "mx.onnx", work / "mx.onnx.data", "-r", "2")
    assert_clean_error(code, out, err, "mx.onnx.data", "input")
    assert snapshot(work.parent) == before


# --------------------------------------------------------------------------------------------
# external data outside the model's folder
# --------------------------------------------------------------------------------------------


def _relocate(work, decoy, how):
    """mx.onnx's weights moved out of its folder, the location pointing there ``how``."""
    model = onnx.load(str(work / "mx.onnx"), load_external_data=False)
    data = work / "mx.onnx.data"
    if how == "traversal":
        (work / "sub").mkdir()
        shutil.move(work / "mx.onnx", work / "sub" / "mx.onnx")
        location, model_path = "../../decoy/x.bin", work / "sub" / "mx.onnx"
        shutil.copy(data, decoy / "x.bin")
    elif how == "absolute":
        location, model_path = str(decoy / "x.bin"), work / "mx.onnx"
        shutil.copy(data, decoy / "x.bin")
    else:  # a link beside the model pointing out
        shutil.copy(data, decoy / "x.bin")
        os.symlink(decoy / "x.bin", work / "link.bin")
        location, model_path = "link.bin", work / "mx.onnx"
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    with open(model_path, "wb") as f:
        f.write(model.SerializeToString())
    return model_path, location


@pytest.mark.parametrize("how", ["traversal", "absolute", "link"])
def test_external_data_outside_the_models_folder_is_refused_at_load(world, how):
    work, decoy = world
    dense = _dense(work)
    src, location = _relocate(work, decoy, how)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(work / "img.png")
    before = snapshot(work.parent)
    commands = [
        ("rewrite", src, work / "o.onnx", "-r", "2"),
        ("verify", src, dense),
        ("inspect", src),
        ("inspect", src, "-r", "2"),
        ("export-dpoa", src, dense, work / "o.onnx"),
        ("export-dpoa", work / "m.onnx", src, work / "o.onnx"),
        ("bench", src, dense, "--repeat", "1", "--warmup", "0"),
        ("run", src, work / "img.png", "--out", work / "maps"),
    ]
    for args in commands:
        code, out, err = run(*args)
        assert_clean_error(code, out, err, "'w1'", location, "outside")
        assert snapshot(work.parent) == before, args


# --------------------------------------------------------------------------------------------
# models that cannot run are not written
# --------------------------------------------------------------------------------------------


def _kernel_5x5(model):
    conv = model.graph.node[0]
    conv.attribute.append(onnx.helper.make_attribute("kernel_shape", [5, 5]))


@pytest.mark.parametrize(
    "edit, args, needles",
    [
        (_kernel_5x5, [], ["kernel_shape"]),
        (None, ["--input-shape", "input:1,4,32,32"], ["input:1,4,32,32", "channel"]),
        (None, ["--input-shape", "input:1,3,1,1"], ["1x3x1x1"]),
        (None, ["--input-shape", "input:1,3,0,32"], ["input"]),
    ],
    ids=["kernel-vs-weight", "channels", "dense-size-0", "zero-dim"],
)
def test_a_model_that_cannot_run_is_not_written(tmp_path, edit, args, needles):
    src = _tiny(tmp_path / "m.onnx", edit=edit)
    before = snapshot(tmp_path)
    code, out, err = run("rewrite", src, tmp_path / "o.onnx", "-r", "2", *args)
    assert_clean_error(code, out, err, *needles)
    assert snapshot(tmp_path) == before
    code, out, err = run("inspect", src, "-r", "2", *args)
    assert_clean_error(code, out, err, *needles)


def test_input_shape_too_small_for_the_dense_grid(tmp_path):
    """Pads let the original run on a tiny input; the dense output there would have no position."""
    text = TINY_NET.replace("c1 = Conv <pads = [1,1,1,1]>", "c1 = Conv <pads = [0,0,0,0]>").replace(
        "float[1,4,8,8] output", "float output")
    src = _tiny(tmp_path / "m.onnx", text=text)
    before = snapshot(tmp_path)
    code, out, err = run("rewrite", src, tmp_path / "o.onnx", "-r", "1", "--input-shape", "input:1,3,3,3")
    assert_clean_error(code, out, err, "1x3x3x3", "--input-shape")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------
# one line and exit 2, not a traceback or exit 3
# --------------------------------------------------------------------------------------------


def test_unwritable_output_folder(world, monkeypatch):
    import tempfile

    work, _ = world

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    before = snapshot(work.parent)
    for src in ("m.onnx", "mx.onnx"):
        code, out, err = run("rewrite", work / src, work / "o.onnx", "-r", "2")
        assert_clean_error(code, out, err, "o.onnx", "Permission denied")
    assert snapshot(work.parent) == before


def test_unwritable_run_output_folder(world, monkeypatch):
    work, _ = world
    dense = _dense(work)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(work / "img.png")

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    code, out, err = run("run", dense, work / "img.png", "--out", work / "maps", "-q")
    assert_clean_error(code, out, err, "maps", "Permission denied")


def test_corrupt_dense_metadata(world):
    work, _ = world
    dense = _dense(work)
    model = onnx.load(str(dense))
    for prop in model.metadata_props:
        if prop.key == "onnx_dense":
            prop.value = prop.value[: len(prop.value) // 2]
    onnx.save(model, str(dense))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(work / "img.png")
    for args in [("verify", work / "m.onnx", dense), ("run", dense, work / "img.png", "--out", work / "maps"),
                 ("bench", work / "m.onnx", dense, "--repeat", "1", "--warmup", "0"),
                 ("rewrite", dense, work / "o.onnx", "-r", "1")]:
        code, out, err = run(*args)
        assert_clean_error(code, out, err, "d.onnx", "onnx_dense metadata")


def _ghost_output(model):
    model.graph.output.append(onnx.helper.make_tensor_value_info("ghost", onnx.TensorProto.FLOAT, None))


def _dangling_input(model):
    model.graph.node[1].input[0] = "nowhere"


@pytest.mark.parametrize("edit, needles", [(_ghost_output, ["'ghost'", "graph output"]),
                                            (_dangling_input, ["'nowhere'", "Relu"])], ids=["ghost", "dangling"])
def test_broken_graphs_are_one_line(tmp_path, edit, needles):
    src = _tiny(tmp_path / "m.onnx", edit=edit)
    before = snapshot(tmp_path)
    for args in [("rewrite", src, tmp_path / "o.onnx", "-r", "2"), ("inspect", src)]:
        code, out, err = run(*args)
        assert_clean_error(code, out, err, *needles)
    code, out, err = _subprocess("rewrite", src, tmp_path / "o.onnx", "-r", "2")
    assert_clean_error(code, out, err, *needles)  # no onnx-ir warning line before it
    assert snapshot(tmp_path) == before


def test_decompression_bomb_warning_is_not_printed(world):
    """Between Pillow's warning limit and its error limit an image is read, silently; beyond, one line."""
    work, _ = world
    dense = _dense(work)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(work / "big.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(work / "huge.png")
    prelude = "import PIL.Image; PIL.Image.MAX_IMAGE_PIXELS = 1000"
    code, out, err = _subprocess("run", dense, work / "big.png", "--out", work / "maps", "-q", prelude=prelude)
    assert code == 0 and err.strip() == "", err
    code, out, err = _subprocess("run", dense, work / "huge.png", "--out", work / "maps2", "-q", prelude=prelude)
    assert_clean_error(code, out, err, "huge.png", "pixels")
    assert not (work / "maps2" / "huge.json").exists()


def test_verify_of_a_model_declared_too_large_runs_smaller_and_says_so(tmp_path):
    text = TINY_NET.replace("float[1,3,32,32] input", "float[1,3,100000,100000] input").replace(
        "float[1,4,8,8] output", "float output")
    src = _tiny(tmp_path / "m.onnx", text=text)
    code, out, err = run("rewrite", src, tmp_path / "d.onnx", "-r", "2")
    assert code == 0, err
    for args in [(), ("--phases",)]:
        code, out, err = run("verify", src, tmp_path / "d.onnx", *args)
        assert code == 0, out + err
        assert "verified at input 1x3x" in out and "declared input size (input 1x3x100000x100000)" in out
        assert "GiB" in out and "PASSED" in out


# --------------------------------------------------------------------------------------------
# quietly wrong
# --------------------------------------------------------------------------------------------


def test_16_bit_png_is_scaled_by_its_bit_depth(tmp_path):
    from onnx_dense.runtime.images import load_image

    values = np.linspace(0, 65535, 32 * 48).reshape(32, 48).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    for channels in (1, 3):
        image = load_image(tmp_path / "g16.png", channels=channels)
        expected = values.astype(np.float64) / 65535
        for c in range(channels):
            np.testing.assert_allclose(image.array[0, c], expected, atol=1 / 255 if channels == 3 else 1e-6)
    rgb16 = np.stack([values, values[::-1], values[:, ::-1]], axis=-1)
    (tmp_path / "c16.png").write_bytes(_png16(rgb16))
    image = load_image(tmp_path / "c16.png", channels=3)
    np.testing.assert_allclose(image.array[0], np.moveaxis(rgb16, -1, 0) / 65535, atol=1 / 255)


def _png16(rgb: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow cannot write 48-bit PNGs)."""
    import struct
    import zlib

    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _non_finite(model):
    for init in model.graph.initializer:
        if init.name == "w2":
            array = onnx.numpy_helper.to_array(init).copy()
            array[0, 0, 1, 1] = np.nan
            array[1, 0, 1, 1] = np.inf
            init.CopyFrom(onnx.numpy_helper.from_array(array, "w2"))


def test_non_finite_weights_verify_when_at_the_same_positions(tmp_path):
    src = _tiny(tmp_path / "m.onnx", edit=_non_finite)
    dense = tmp_path / "d.onnx"
    assert run("rewrite", src, dense, "-r", "2")[0] == 0
    code, out, err = run("verify", src, dense)
    assert code == 0, out + err
    assert "non-finite" in out
    model = onnx.load(str(dense))  # NaN where the original has a number: a difference
    for init in model.graph.initializer:
        if init.name == "w1":
            array = onnx.numpy_helper.to_array(init).copy()
            array[0, 0, 0, 0] = np.nan
            init.CopyFrom(onnx.numpy_helper.from_array(array, "w1"))
    onnx.save(model, str(dense))
    code, out, err = run("verify", src, dense)
    assert code == 1, out + err


# --------------------------------------------------------------------------------------------
# fuzz: seeded hostile layouts, every file-taking subcommand, the same four promises
# --------------------------------------------------------------------------------------------

#: Each command, with the model slots it reads (filled by a hostile model in some scenarios).
COMMANDS = {
    "rewrite": lambda w, s: ("rewrite", s.get("src", w / "m.onnx"), w / "o.onnx", "-r", "2"),
    "verify": lambda w, s: ("verify", s.get("src", w / "m.onnx"), s.get("dense", w / "d.onnx")),
    "inspect": lambda w, s: ("inspect", s.get("src", w / "m.onnx"), "-r", "2"),
    "export-dpoa": lambda w, s: ("export-dpoa", s.get("src", w / "m.onnx"), s.get("dense", w / "d.onnx"), w / "o.onnx"),
    "run": lambda w, s: ("run", s.get("dense", w / "d.onnx"), w / "img.png", "--out", w / "maps", "-q"),
    "bench": lambda w, s: ("bench", s.get("src", w / "m.onnx"), s.get("dense", w / "d.onnx"), "--repeat", "1",
                           "--warmup", "0"),
}
DENSE_READERS = ("verify", "export-dpoa", "run", "bench")  # take a dense model
SOURCE_READERS = ("rewrite", "verify", "inspect", "export-dpoa", "bench")  # take an original


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    work, decoy = root / "work", root / "decoy"
    work.mkdir()
    (decoy / "dir").mkdir(parents=True)
    (decoy / "precious.bin").write_bytes(b"precious" * 64)
    _tiny(work / "m.onnx")
    _tiny(work / "mx.onnx", external=True)
    for src, dst in (("m.onnx", "d.onnx"), ("mx.onnx", "dx.onnx")):
        code, _, err = run("rewrite", work / src, work / dst, "-r", "2")
        assert code == 0, err
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(work / "img.png")
    for name in (".o.onnx.tmp", ".o.onnx.data.tmp", ".img.json.tmp"):  # links where a careless writer might put temps
        os.symlink(decoy / "precious.bin", work / name)
    return root


def _external_location(model_path: Path, location: str) -> None:
    model = onnx.load(str(model_path), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    model_path.write_bytes(model.SerializeToString())


def _edit(path: Path, edit) -> None:
    model = onnx.load(str(path))
    edit(model)
    path.write_bytes(model.SerializeToString())


def _metadata_edit(change):
    def edit(model):
        import json

        for prop in model.metadata_props:
            if prop.key == "onnx_dense":
                prop.value = change(prop.value, json.loads(prop.value))
    return edit


def _set(path, value):
    def change(text, data):
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        import json

        return json.dumps(data)
    return change


METADATA_EDITS = {
    "truncated": lambda text, data: "{" + text[7:40],
    "not-an-object": lambda text, data: "[1, 2]",
    "est-0": _set(["outputs", "output", "est"], [0, 0]),
    "axes-beyond-rank": _set(["outputs", "output", "spatial_axes"], [7, 9]),
    "stride-text": _set(["outputs", "output", "stride"], "x"),
    "unknown-input": _set(["outputs", "output", "input"], "nope"),
    "rf-empty": _set(["outputs", "output", "rf_size"], []),
    "unknown-output": lambda text, data: text.replace('"output"', '"ghost"'),
}


def _reversed_nodes(model):
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))


def _defined_twice(model):
    model.graph.node[1].output[0] = "c1"


def _short_weights(model):
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:50]


def _negative_dims(model):
    model.graph.initializer[0].dims[0] = -model.graph.initializer[0].dims[0]


def _no_outputs(model):
    del model.graph.output[:]


def _scenarios(rng: np.random.Generator):
    """(id, command, setup(work, decoy) -> slots) for every hostile kind, random details seeded."""
    found = []
    # 1. a symbolic link at every output path, to a decoy file, nothing, an input, a folder
    outputs = [("rewrite", "o.onnx", {}), ("rewrite", "o.onnx", {"src": "mx.onnx"}),
               ("rewrite", "o.onnx.data", {"src": "mx.onnx"}), ("export-dpoa", "o.onnx", {}),
               ("run", "maps/img.json", {}), ("run", "maps/img.output.npy", {}), ("run", "maps/img.output.png", {})]
    for command, out, slots in outputs:
        for target in ("decoy/precious.bin", "decoy/missing.bin", "work/m.onnx", "decoy/dir"):
            def setup(work, decoy, out=out, target=target, slots=slots):
                (work / out).parent.mkdir(exist_ok=True)
                os.symlink(work.parent / target, work / out)
                return {k: work / v for k, v in slots.items()}
            found.append((f"link-{command}-{out}-{target.split('/')[-1]}", command, setup))
    # 2. names that collide: outputs that are inputs or their weights, in several spellings
    def spelled(work, name):
        return rng.choice([work / name, work / "." / name, work.parent / "work" / name, Path(os.path.relpath(work / name))])

    collisions = [
        ("rewrite", lambda w: ("rewrite", w / "m.onnx", spelled(w, "m.onnx"), "-r", "2")),
        ("rewrite", lambda w: ("rewrite", w / "mx.onnx", spelled(w, "mx.onnx.data"), "-r", "2")),
        ("rewrite", lambda w: (shutil.copy(w / "mx.onnx", w / "o.onnx.data"), "rewrite", w / "o.onnx.data",
                               w / "o.onnx", "-r", "2")[1:]),
        ("export-dpoa", lambda w: ("export-dpoa", w / "m.onnx", w / "d.onnx", spelled(w, "m.onnx"))),
        ("export-dpoa", lambda w: ("export-dpoa", w / "m.onnx", w / "d.onnx", spelled(w, "d.onnx"))),
        ("export-dpoa", lambda w: ("export-dpoa", w / "mx.onnx", w / "dx.onnx", spelled(w, "mx.onnx.data"))),
        ("export-dpoa", lambda w: ("export-dpoa", w / "m.onnx", w / "d.onnx", w / "o.onnx", "--dense-out",
                                   spelled(w, "o.onnx"))),
        ("export-dpoa", lambda w: ("export-dpoa", w / "m.onnx", w / "d.onnx", w / "o.onnx", "--dense-out",
                                   spelled(w, "d.onnx"))),
        ("run", lambda w: ((w / "maps").mkdir(), shutil.copy(w / "img.png", w / "maps" / "img.json"), "run",
                           w / "d.onnx", w / "maps" / "img.json", "--out", w / "maps", "-q")[2:]),
    ]
    for i, (command, args) in enumerate(collisions):
        found.append((f"collide-{command}-{i}", command, lambda work, decoy, args=args: args(work)))
    # 3. external data outside the model's folder, in each slot that reads a model
    hows = ["traversal", "absolute", "link", "deep-link", "sub-traversal"]
    for command in COMMANDS:
        for slot in (["src"] if command in SOURCE_READERS else []) + (["dense"] if command in DENSE_READERS else []):
            how = hows[int(rng.integers(len(hows)))]

            def setup(work, decoy, how=how, slot=slot):
                name = "mx.onnx" if slot == "src" else "dx.onnx"
                data = work / (name + ".data")
                shutil.copy(data, decoy / "x.bin")
                location = {"traversal": "../decoy/x.bin", "absolute": str(decoy / "x.bin"), "link": "ln.bin",
                            "deep-link": "sub/ln.bin", "sub-traversal": "sub/../../decoy/x.bin"}[how]
                if how == "link":
                    os.symlink(decoy / "x.bin", work / "ln.bin")
                if how in ("deep-link", "sub-traversal"):
                    os.symlink(decoy, work / "sub") if how == "deep-link" else (work / "sub").mkdir()
                    if how == "deep-link":
                        os.symlink(decoy / "x.bin", decoy / "ln.bin")
                _external_location(work / name, location)
                return {slot: work / name}
            found.append((f"outside-{command}-{slot}-{how}", command, setup))
    # 4. truncated models and weights
    for command in COMMANDS:
        slot = "dense" if command == "run" else ("src" if command != "verify" else rng.choice(["src", "dense"]))
        fraction = float(rng.uniform(0.02, 0.98))
        for what in ("model", "data"):
            def setup(work, decoy, slot=slot, what=what, fraction=fraction):
                name = ("m.onnx" if what == "model" else "mx.onnx") if slot == "src" else \
                       ("d.onnx" if what == "model" else "dx.onnx")
                path = work / (name if what == "model" else name + ".data")
                data = path.read_bytes()
                path.write_bytes(data[: int(len(data) * fraction)])
                return {slot: work / name}
            found.append((f"truncated-{command}-{slot}-{what}-{fraction:.2f}", command, setup))
    # 5. invalid graphs
    edits = {"ghost-output": _ghost_output, "dangling-input": _dangling_input, "kernel-vs-weight": _kernel_5x5,
             "unsorted": _reversed_nodes, "defined-twice": _defined_twice, "short-weights": _short_weights,
             "negative-dims": _negative_dims, "no-outputs": _no_outputs}
    for command in COMMANDS:
        for label, edit in edits.items():
            slot = "dense" if command == "run" else "src"
            if command in SOURCE_READERS or label != "kernel-vs-weight":
                def setup(work, decoy, slot=slot, edit=edit):
                    path = work / ("m.onnx" if slot == "src" else "d.onnx")
                    _edit(path, edit)
                    return {slot: path}
                found.append((f"graph-{command}-{label}", command, setup))
        if command in DENSE_READERS:
            for label in METADATA_EDITS:
                def setup(work, decoy, label=label):
                    _edit(work / "d.onnx", _metadata_edit(METADATA_EDITS[label]))
                    return {"dense": work / "d.onnx"}
                found.append((f"metadata-{command}-{label}", command, setup))
    return found


FUZZ_SEED = 16


def test_hostile_files_fuzz(template, tmp_path):
    """Every scenario: exit 2, one line on stderr, nothing written anywhere, inputs byte-identical."""
    rng = np.random.default_rng(FUZZ_SEED)
    scenarios = _scenarios(rng)
    assert len(scenarios) > 60
    failures = []
    for i, (label, command, setup) in enumerate(scenarios):
        root = tmp_path / f"s{i}"
        shutil.copytree(template, root, symlinks=True)
        work, decoy = root / "work", root / "decoy"
        cwd = os.getcwd()
        os.chdir(work)  # relative spellings resolve here
        try:
            made = setup(work, decoy)
            args = made if isinstance(made, tuple) else COMMANDS[command](work, made)
            before = snapshot(root)
            code, out, err = run(*args)
            after = snapshot(root)
        finally:
            os.chdir(cwd)
        lines = err.strip().splitlines()
        problems = []
        if code != 2:
            problems.append(f"exit {code}")
        if len(lines) != 1 or not lines[0].startswith("onnx-dense: error: ") or "Traceback" in out + err:
            problems.append(f"stderr {err!r}")
        if after != before:
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            problems.append(f"touched {[os.path.relpath(c, root) for c in changed]}")
        if problems:
            failures.append(f"{label}: {'; '.join(problems)} ({lines[-1] if lines else out[-200:]!r})")
    assert not failures, f"{len(failures)} of {len(scenarios)} hostile scenarios:\n" + "\n".join(failures)


def test_hostile_files_in_a_subprocess(world):
    """The real entry point on three of them: exit code, one stderr line, no warning line before it."""
    work, decoy = world
    _tiny(work / "dangling.onnx", edit=_dangling_input)
    os.symlink(decoy / "precious.bin", work / "o.onnx.data")
    before = snapshot(work.parent)
    for args in [("rewrite", work / "dangling.onnx", work / "p.onnx", "-r", "2"),
                 ("rewrite", work / "mx.onnx", work / "o.onnx", "-r", "2"),
                 ("rewrite", work / "mx.onnx", work / "mx.onnx.data", "-r", "2")]:
        code, out, err = _subprocess(*args)
        assert_clean_error(code, out, err)
    assert snapshot(work.parent) == before


def test_train_checks_its_output_paths_before_the_first_step(world):
    pytest.importorskip("torch")
    work, decoy = world
    dense = _dense(work)
    rng = np.random.default_rng(0)
    np.savez(work / "data.npz", images=rng.standard_normal((2, 3, 32, 32)).astype(np.float32),
             labels=np.array([0, 1]))
    (work / "ck").mkdir()
    os.symlink(decoy / "precious.bin", work / "ck" / "last.pt")
    os.symlink(decoy / "precious.bin", work / "trained.onnx")
    before = snapshot(work.parent)
    base = ("train", dense, "--task", "classification", "--data", work / "data.npz", "--steps", "1", "-b", "2", "-q")
    code, out, err = run(*base, "--checkpoint-dir", work / "ck")
    assert_clean_error(code, out, err, "last.pt", "symbolic link")
    code, out, err = run(*base, "--checkpoint-dir", work / "ck2", "--out", work / "trained.onnx")
    assert_clean_error(code, out, err, "trained.onnx", "symbolic link")
    code, out, err = run(*base, "--checkpoint-dir", work / "ck2", "--out", dense)
    assert_clean_error(code, out, err, "d.onnx", "input")
    assert snapshot(work.parent) == before  # no checkpoint folder, no step written


CLASSIFIER = """
<ir_version: 9, opset_import: ["" : 20]>
net (float[1,3,32,32] input) => (float[1,10] output) <float[8,3,3,3] w1, float[10,2048] wf> {
    c1 = Conv <pads = [1,1,1,1]> (input, w1)
    r1 = Relu (c1)
    p1 = MaxPool <kernel_shape = [2,2], strides = [2,2]> (r1)
    f = Flatten (p1)
    output = Gemm <transB = 1> (f, wf)
}
"""


def test_the_runnable_check_covers_only_what_outputs_keeps(tmp_path):
    """A head that only runs at the export size is no reason to refuse a cut before it."""
    model = with_weights(CLASSIFIER, {"w1": (8, 3, 3, 3), "wf": (10, 2048)})
    onnx.save(model, str(tmp_path / "cls.onnx"))
    shape = ("--input-shape", "input:1,3,48,48")
    code, out, err = run("rewrite", tmp_path / "cls.onnx", tmp_path / "d.onnx", "-r", "1", *shape)
    assert_clean_error(code, out, err, "cls.onnx", "input:1,3,48,48", "Gemm")
    code, out, err = run("rewrite", tmp_path / "cls.onnx", tmp_path / "d.onnx", "-r", "1", *shape, "--outputs", "p1")
    assert code == 0, err
    code, out, err = run("inspect", tmp_path / "cls.onnx", "-r", "1", *shape, "--outputs", "p1")
    assert code == 0, err


def test_training_images_of_16_bits_are_scaled_by_their_bit_depth_too(tmp_path):
    """A dark 16-bit image (every value under 256) was read as if it had 8 bits: 257 times too bright."""
    from onnx_dense.train.data import _read_image

    values = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 200
    Image.fromarray(values).save(tmp_path / "dark16.png")
    np.testing.assert_allclose(_read_image(tmp_path / "dark16.png", 3)[0], values / 65535, atol=1e-6)
