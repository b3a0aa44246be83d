"""The ``onnx-dense`` console script: huge pages for budgeted runs, then the command line.

Why. A run under ``--max-memory`` (or a forced phase schedule) uses stage sessions without
onnxruntime's memory arena, so that its peak is what it needs: every value is a fresh
``malloc``, and glibc maps each large one anew, its pages faulted in 4 KiB at a time. With
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` glibc asks for transparent huge pages on those
maps (where the kernel's mode is ``madvise``): the ResNet of ``benchmarks/schedules.py``
under a budget went from 1.48x / 1.58x to 1.27x / 1.29x the whole run at 2048 / 4096, at the
same peak (benchmarks/README.md). glibc reads tunables only when a process starts, so this
script starts itself again (``execve``: same process id, arguments and files) before the
command line is imported. Nothing heavy is imported before that: the package imports its API
(onnx, onnx-ir: 1.1 s here) when first used, which took a budgeted run at 2048 pixels from
5.0-5.3 s to 3.9-4.7 s end to end (the whole run: 3.6-4.5 s). Whole runs keep onnxruntime's
arena and are left as they are: huge pages made their first run slower. ``ONNX_DENSE_HUGEPAGES=0`` turns this off; library users set
``GLIBC_TUNABLES`` themselves.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"
_BUDGET_OPTIONS = ("--max-memory", "--schedule")


def main() -> int:
    env = huge_pages_env(sys.argv, os.environ, _thp_mode(), sys.platform, platform.libc_ver()[0])
    if env is not None and os.path.isfile(sys.argv[0]) and os.access(sys.argv[0], os.X_OK):
        try:
            os.execve(sys.argv[0], sys.argv, env)
        except OSError:
            pass  # run as we are
    from onnx_dense.cli import main as cli_main

    return cli_main()


def huge_pages_env(argv, environ, thp_mode: str | None, platform_name: str, libc: str) -> dict | None:
    """The environment to start again with, or None to go on as we are."""
    if not platform_name.startswith("linux") or libc != "glibc" or thp_mode != "madvise":
        return None
    if environ.get("ONNX_DENSE_HUGEPAGES", "1") == "0":
        return None
    args = list(argv[1:])
    if not args or args[0] != "run":
        return None
    if not any(a == o or a.startswith(o + "=") for a in args for o in _BUDGET_OPTIONS):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:  # set already (by the user, or by our first start)
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return env


def _thp_mode() -> str | None:
    """The kernel's transparent huge page mode: 'always', 'madvise', 'never' (None: unknown)."""
    try:
        with open(_THP) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


if __name__ == "__main__":
    sys.exit(main())
