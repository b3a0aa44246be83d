"""Writing a file so that nobody ever sees half of it: every model, checkpoint, map and picture
onnx-dense writes goes through :func:`atomic_output`.

The data goes to a temporary file beside the target (same folder, so the rename cannot cross
file systems), which is renamed over the target only when writing succeeded; on any failure
it is removed and the target is left as it was. mkstemp creates the file 0600: it gets the
mode any other new file would (0666 minus the umask). An OSError (a full disk, a read-only
folder) becomes one DenseError line naming the target.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from onnx_dense.errors import DenseError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, what: str = "the file") -> Iterator[str]:
    """``with atomic_output(out, "the model") as tmp: write(tmp)``; ``out`` appears only if the block succeeds."""
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        os.replace(tmp, out)
    except DenseError:
        raise
    except OSError as exc:
        raise DenseError(f"{out}: could not write {what} ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
