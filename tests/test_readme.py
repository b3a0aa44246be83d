"""The README runs as written: its code blocks, in order, in a fresh copy of the repository.

The convention (README.md is written to it):

* a ```bash block is run with ``bash -e`` from the repository root;
* a ```python block is saved to a file *outside* the repository and run with ``python FILE``
  from the repository root, as a reader who saves a snippet would (so ``samples`` is not
  importable from it: only ``onnx_dense``, the installed package, is);
* a ```text or ```console-output block (output, a transcript) is not run, nor is a block whose
  fence is preceded, on the line just before it, by ``<!-- docs-test: skip (reason) -->``;
* an untagged block is an error: say what it is.

The copy holds what ``git ls-files`` lists (tracked and untracked, not ignored), so files the
README needs must be made by an earlier block (``python -m samples.make_samples``), not left
lying around. ``onnx_dense`` is imported from the copy; ``onnx-dense`` runs the copy's code with
this interpreter. A failure names the block (its number and README line), shows it and the
last lines of its output.

The README's pictures are files these commands write: ``ONNX_DENSE_DOCS_PICTURES=1 pytest
tests/test_readme.py`` copies them into docs/ after the run (:data:`PICTURES`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUN = {"bash", "python"}
SHOWN = {"text", "console-output"}
SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
#: docs/ picture <- the file a README command writes (in the copy's root)
PICTURES = {
    "docs/verify.png": "verify.png",
    "docs/run_labels.png": "maps/scene.output.png",
    "docs/run_heatmap.png": "maps_vgg/scene.output.png",
    "docs/bench.png": "bench.png",
}
BLOCK_TIMEOUT = 300  # seconds; the whole README runs in about 2 minutes on 2 cores


@dataclasses.dataclass
class Block:
    number: int  # 1-based, counting every fenced block
    line: int  # README line of the opening fence
    lang: str
    code: str
    skip: str | None  # the reason, when marked

    @property
    def runs(self) -> bool:
        return self.lang in RUN and self.skip is None

    def where(self) -> str:
        return f"README.md block {self.number} (line {self.line}, ```{self.lang or '(untagged)'})"


def blocks(text: str) -> list[Block]:
    found: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        before = lines[start - 1] if start else ""
        skip = SKIP.match(before.strip())
        found.append(Block(len(found) + 1, start + 1, m.group("lang"), "\n".join(lines[start + 1 : j]) + "\n",
                           skip.group("reason") if skip else None))
        i = j + 1
    return found


def test_every_block_follows_the_convention():
    """Tagged bash/python (run) or text/console-output (shown); a skip marker gives its reason."""
    text = README.read_text(encoding="utf-8")
    found = blocks(text)
    assert found, "no code blocks found in README.md"
    bad = [b.where() for b in found if b.lang not in RUN | SHOWN]
    assert not bad, "tag these blocks ```bash, ```python, ```text or ```console-output: " + ", ".join(bad)
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("<!--") and "docs-test" in line:
            assert SKIP.match(line.strip()), f"README.md line {n}: write <!-- docs-test: skip (reason) -->, not {line!r}"
    assert sum(b.runs for b in found) >= 8, "most of the README's examples should run"


def test_every_picture_is_committed_and_small():
    """Pictures the README shows are PNGs under docs/, each under 200 KB."""
    names = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text(encoding="utf-8"))
    assert names, "the README shows no picture"
    for name in names:
        path = ROOT / name
        assert name.startswith("docs/") and name.endswith(".png"), f"README picture {name}: put PNGs under docs/"
        assert path.is_file(), f"README shows {name}, which does not exist"
        assert path.stat().st_size < 200_000, f"{name} is {path.stat().st_size} bytes; keep pictures under 200 KB"


def test_the_parser_sees_what_a_reader_sees():
    text = "a\n```bash\necho 1\n```\n<!-- docs-test: skip (needs a GPU) -->\n```python\nx\n```\n```text\nout\n```\n"
    found = blocks(text)
    assert [(b.lang, b.runs, b.skip, b.line) for b in found] == [
        ("bash", True, None, 2), ("python", False, "needs a GPU", 6), ("text", False, None, 9)
    ]
    assert found[0].code == "echo 1\n"


def _copy_repository(dest: Path) -> None:
    """What a fresh clone has: git's tracked and untracked-but-not-ignored files."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = None
    if listed is None:  # not a git checkout (an unpacked sdist): the same minus the usual litter
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", ".venv*", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis", "build", "dist"))
        return
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def test_copy_without_git_fills_the_prepared_folder(tmp_path, monkeypatch):
    """An unpacked sdist (no git): the copy goes into the folder the test made, minus the litter."""
    root = tmp_path / "root"
    (root / "pkg").mkdir(parents=True)
    (root / "README.md").write_text("r")
    (root / "pkg" / "a.py").write_text("a")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.pyc").write_text("x")

    def no_git(*args, **kwargs):
        raise OSError("git: not found")

    monkeypatch.setattr(sys.modules[__name__], "ROOT", root)
    monkeypatch.setattr(subprocess, "run", no_git)
    dest = tmp_path / "repo"
    dest.mkdir()
    _copy_repository(dest)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == ["README.md", "pkg/a.py"]


def _environment(tmp: Path, repo: Path) -> dict[str, str]:
    """The copy's onnx_dense first on the path (and nothing else of it), its CLI on PATH."""
    site = tmp / "site"
    site.mkdir()
    (site / "onnx_dense").symlink_to(repo / "onnx_dense", target_is_directory=True)
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "onnx-dense"
    shim.write_text(
        f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c 'import sys; from onnx_dense.cli import main; sys.exit(main())' \"$@\"\n"
    )
    shim.chmod(0o755)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(site)
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MPLBACKEND"] = "Agg"
    env.pop("ONNX_DENSE_DEBUG", None)
    return env


def _tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def test_readme_runs_as_written(tmp_path):
    pytest.importorskip("torch", reason="the README's samples and training need PyTorch")
    repo = tmp_path / "repo"
    repo.mkdir()
    _copy_repository(repo)
    env = _environment(tmp_path, repo)
    scripts = tmp_path / "snippets"
    scripts.mkdir()
    timings = []
    for block in blocks((repo / "README.md").read_text(encoding="utf-8")):
        if not block.runs:
            continue
        if block.lang == "bash":
            command = ["bash", "-e", "-o", "pipefail", "-c", block.code]
        else:
            script = scripts / f"block_{block.number}.py"
            script.write_text(block.code)
            command = [sys.executable, str(script)]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            pytest.fail(f"{block.where()} ran past {BLOCK_TIMEOUT} s:\n{block.code}--- output ---\n{_tail(out)}")
        timings.append((block.number, time.perf_counter() - start))
        if done.returncode != 0:
            pytest.fail(
                f"{block.where()} failed with exit code {done.returncode}:\n{block.code}"
                f"--- stdout ---\n{_tail(done.stdout)}\n--- stderr ---\n{_tail(done.stderr)}",
                pytrace=False,
            )
    assert timings, "no block of README.md ran"
    for picture, made in PICTURES.items():
        assert (repo / made).is_file(), f"the README's commands no longer write {made} (shown as {picture})"
        if os.environ.get("ONNX_DENSE_DOCS_PICTURES"):
            (ROOT / picture).parent.mkdir(exist_ok=True)
            shutil.copyfile(repo / made, ROOT / picture)
    print("README blocks (number, seconds):", ", ".join(f"{n}: {s:.1f}" for n, s in timings))
