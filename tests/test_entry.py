"""The console script starts budgeted runs again with huge pages for glibc (onnx_dense/_entry.py)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest

from onnx_dense import _entry


def env_for(*argv, environ=None, thp="madvise", plat="linux", libc="glibc"):
    return _entry.huge_pages_env(["onnx-dense", *argv], environ or {"PATH": "/bin"}, thp, plat, libc)


def test_only_budgeted_runs_start_again_with_huge_pages():
    env = env_for("run", "m.onnx", "x.png", "--out", "o", "--max-memory", "2GB")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert env_for("run", "m.onnx", "x.png", "--schedule=phases")["GLIBC_TUNABLES"] == _entry.TUNABLE
    # whole runs keep onnxruntime's arena: nothing changes for them, nor for other commands
    assert env_for("run", "m.onnx", "x.png", "--out", "o") is None
    assert env_for("rewrite", "a.onnx", "b.onnx", "--max-memory", "1GB") is None
    assert env_for() is None
    # the user's own tunables are kept, and a second start changes nothing (no loop)
    kept = env_for("run", "m", "x", "--max-memory", "1GB", environ={"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert env_for("run", "m", "x", "--max-memory", "1GB", environ=kept) is None
    # where it cannot help, or is not wanted
    assert env_for("run", "m", "x", "--max-memory", "1GB", thp="always") is None
    assert env_for("run", "m", "x", "--max-memory", "1GB", thp=None) is None
    assert env_for("run", "m", "x", "--max-memory", "1GB", plat="darwin") is None
    assert env_for("run", "m", "x", "--max-memory", "1GB", libc="musl") is None
    assert env_for("run", "m", "x", "--max-memory", "1GB", environ={"ONNX_DENSE_HUGEPAGES": "0"}) is None


@pytest.mark.skipif(_entry._thp_mode() != "madvise" or platform.libc_ver()[0] != "glibc" or not sys.platform.startswith("linux"),
                    reason="huge pages for glibc need Linux, glibc and the kernel's madvise mode")
def test_the_script_starts_again_with_the_same_arguments_and_the_tunable(tmp_path):
    """The script execs itself: a stand-in at sys.argv[0] reports what it was started with."""
    standin = tmp_path / "onnx-dense"
    standin.write_text(f"#!{sys.executable}\nimport os, sys\nprint(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n")
    standin.chmod(0o755)
    code = textwrap.dedent(f"""
        import sys
        sys.argv[0] = {str(standin)!r}
        from onnx_dense._entry import main
        sys.exit(main())
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "ONNX_DENSE_HUGEPAGES")}
    out = subprocess.run([sys.executable, "-c", code, "run", "m.onnx", "x.png", "--max-memory", "1GB"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "glibc.malloc.hugetlb=1 ['run', 'm.onnx', 'x.png', '--max-memory', '1GB']", out


def test_the_installed_script_runs_a_budgeted_run(tmp_path):
    """End to end through the console script that pip wrote (skipped where there is none)."""
    script = shutil.which("onnx-dense", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("no onnx-dense console script next to this Python")
    pytest.importorskip("torch")
    import numpy as np

    import onnx_dense
    from samples import export, zoo

    export.export_onnx(zoo.build("fcn"), None, tmp_path / "fcn.onnx")
    onnx_dense.rewrite(tmp_path / "fcn.onnx", tmp_path / "dense.onnx", output_stride=2)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((3, 96, 96), dtype=np.float32))
    out = subprocess.run([script, "run", str(tmp_path / "dense.onnx"), str(tmp_path / "x.npy"), "--out",
                          str(tmp_path / "o"), "--max-memory", "2GB", "--view", "none"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "x.npy: whole" in out.stderr and (tmp_path / "o" / "x.output.npy").exists()


def test_the_script_imports_nothing_heavy_before_it_starts_again():
    """The restart pays for what was imported before it: onnx_dense's package imported onnx,
    onnx-ir and the passes (1.1 s here, 1.2-1.3x a budgeted run's wall time at 2048 pixels).
    The package's API is now imported when first used."""
    code = "import sys, onnx_dense._entry; print(sorted(m for m in ('onnx', 'onnx_ir', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out


def test_the_packages_api_is_there_when_used():
    import onnx_dense

    assert callable(onnx_dense.rewrite) and callable(onnx_dense.verify) and callable(onnx_dense.inspect_model)
    assert callable(onnx_dense.rewrite_model) and issubclass(onnx_dense.DenseError, Exception)
    assert set(onnx_dense.__all__) <= set(dir(onnx_dense))
    with pytest.raises(AttributeError):
        onnx_dense.not_there  # noqa: B018
