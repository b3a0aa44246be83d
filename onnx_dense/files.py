"""Writing a file so that nobody ever sees half of it, and never through a link: every model,
checkpoint, map and picture onnx-dense writes goes through :func:`atomic_output` (one file) or
:func:`atomic_outputs` (a model and its external data file).

The data goes to a temporary file beside the target (same folder, so the rename cannot cross
file systems), which is renamed over the target only when writing succeeded; on any failure
it is removed and the target is left as it was. mkstemp creates the file 0600: it gets the
mode any other new file would (0666 minus the umask). An OSError (a full disk, a read-only
folder, no permission) becomes one DenseError line naming the target.

A target that is a symbolic link (dangling or not) is refused before anything is written:
renaming over it would silently turn the link into a file, and libraries that write in place
(onnx-ir's external data writer resolves the link) would replace the file it points to, in
another folder. The user removes the link or picks another name. A linked *folder* is fine:
the user named it as the place to write.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from onnx_dense.errors import DenseError


def refuse_link(path: str | os.PathLike, what: str = "the output") -> None:
    """One DenseError line if ``path`` is a symbolic link: onnx-dense never writes through one."""
    p = Path(path)
    if p.is_symlink():
        try:
            target = os.readlink(p)
        except OSError:  # pragma: no cover - raced away
            target = "?"
        raise DenseError(
            f"{p}: is a symbolic link (to {target}); onnx-dense does not write {what} through links: "
            "remove the link or choose another output path"
        )


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, what: str = "the file") -> Iterator[str]:
    """``with atomic_output(out, "the model") as tmp: write(tmp)``; ``out`` appears only if the block succeeds."""
    out = Path(path)
    refuse_link(out, what)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise DenseError(f"{out}: could not write {what} ({exc.strerror or exc})") from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        refuse_link(out, what)  # appeared while writing
        os.replace(tmp, out)
    except DenseError:
        raise
    except OSError as exc:
        raise DenseError(f"{out}: could not write {what} ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[str | os.PathLike], what: str = "the model") -> Iterator[list[str]]:
    """Files that belong together, all in one folder (a model and its ``.data``).

    Yields their paths inside a fresh private folder beside them, under their final names (so
    a model's relative external-data location stays right); when the block succeeds they are
    renamed into place, the first one (the model) last, so a reader never finds a model whose
    weights are not there yet. Files the block did not create are left alone.
    """
    outs = [Path(p) for p in paths]
    for out in outs:
        refuse_link(out, what)
    folder = outs[0].parent
    try:
        tmpdir = tempfile.mkdtemp(prefix=f".{outs[0].name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise DenseError(f"{outs[0]}: could not write {what} ({exc.strerror or exc})") from None
    try:
        temps = [os.path.join(tmpdir, out.name) for out in outs]
        yield temps
        mode = 0o666 & ~_umask()
        for out, tmp in reversed(list(zip(outs, temps))):
            if os.path.exists(tmp):
                os.chmod(tmp, mode)
                refuse_link(out, what)
                os.replace(tmp, out)
    except DenseError:
        raise
    except OSError as exc:
        raise DenseError(f"{outs[0]}: could not write {what} ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
