"""Buffers reused across the runs of one stage: a phase's or tile's inputs and outputs.

Why. A budgeted run calls the same stage session once per phase or tile, and each call used to
copy its inputs into fresh arrays and get its outputs in fresh arrays. A fresh block of this
size comes from mmap, so every one of its pages is faulted in again: on the 2-core VM of
benchmarks/README.md 0.3 s (huge pages) to 1.2 s per GB, more than the copy itself, which
the whole model's session, with its arena, pays once. Here the first run of a stage in a loop
allocates; the next runs write into the same memory: inputs copied into it, outputs written
into it by onnxruntime through IO binding (an output bound to a buffer of its shape).

Phases and tiles of a loop differ in size by at most one position per axis, and the first is
the largest, so one flat buffer per input and output serves them all (its first ``prod(shape)``
values, as a contiguous array of that shape). The caller owns the lifetime: a
:class:`Buffers` lives as long as the loop over sibling runs, and what a run returns is
overwritten by the next run with the same buffers, so it must be used (copied, stitched, run
below) first. onnxruntime's IO binding needs each output's shape before the run, so the
first run of a given set of input shapes is an ordinary run, whose outputs (onnxruntime's own
arrays) become the buffers; its output shapes are remembered for the next runs of those
input shapes.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np


class Buffers:
    """Flat arrays by key, grown when a larger shape asks (the old one is then dropped)."""

    def __init__(self) -> None:
        self._flat: dict[object, np.ndarray] = {}

    def array(self, key: object, shape, dtype) -> np.ndarray:
        n = math.prod(shape)
        flat = self._flat.get(key)
        if flat is None or flat.dtype != dtype or flat.size < n:
            self._flat.pop(key, None)  # before allocating: never the old and the new at once
            flat = self._flat[key] = np.empty(n, dtype=dtype)
        return flat[:n].reshape(shape)

    def adopt(self, key: object, value: np.ndarray) -> None:
        """Keep ``value``'s memory for ``key`` (an array the run just made, no longer needed after it)."""
        flat = self._flat.get(key)
        if value.flags.c_contiguous and value.flags.writeable and (flat is None or flat.size < value.size):
            self._flat[key] = value.reshape(-1)

    def drop(self, kind: str) -> None:
        """Let go of the ``"in"`` (or ``"out"``) buffers."""
        for key in [k for k in self._flat if k[0] == kind]:
            del self._flat[key]

    def clear(self) -> None:
        self._flat.clear()

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._flat.values())


class StageRunner:
    """One onnxruntime ``InferenceSession`` as a function of numpy feeds, with or without :class:`Buffers`."""

    def __init__(self, session, on_error=None) -> None:
        self.session = session
        self.names = [o.name for o in session.get_outputs()]
        self.on_error = on_error  # exc, feeds -> the exception to raise
        self._shapes: dict[tuple, list[tuple[tuple, np.dtype]]] = {}  # input shapes -> output shapes and types

    def __call__(self, feeds: Mapping[str, np.ndarray], buffers: Buffers | None = None) -> dict[str, np.ndarray]:
        try:
            if buffers is None:
                return dict(zip(self.names, self.session.run(None, {k: np.ascontiguousarray(v)
                                                                     for k, v in feeds.items()})))
            return self._bound(feeds, buffers)
        except Exception as exc:
            if self.on_error is None:
                raise
            raise self.on_error(exc, feeds) from None

    def _bound(self, feeds: Mapping[str, np.ndarray], buffers: Buffers) -> dict[str, np.ndarray]:
        contiguous = {}
        for name, value in feeds.items():
            if not value.flags.c_contiguous:  # a phase's view: copied into this input's buffer
                copy = buffers.array(("in", name), value.shape, value.dtype)
                np.copyto(copy, value)
                value = copy
            contiguous[name] = value
        key = tuple((name, value.shape, value.dtype.str) for name, value in sorted(contiguous.items()))
        shapes = self._shapes.get(key)
        if shapes is None:  # onnxruntime allocates; the old outputs' buffers go first, never both at once
            buffers.drop("out")
            outs = dict(zip(self.names, self.session.run(None, contiguous)))
            self._shapes[key] = [(v.shape, v.dtype) for v in outs.values()]
            for name, value in outs.items():
                buffers.adopt(("out", name), value)
            return outs
        binding = self.session.io_binding()
        for name, value in contiguous.items():
            binding.bind_cpu_input(name, value)
        outs = {}
        for name, (shape, dtype) in zip(self.names, shapes):
            out = outs[name] = buffers.array(("out", name), shape, dtype)
            binding.bind_output(name, "cpu", 0, dtype, list(shape), out.ctypes.data)
        self.session.run_with_iobinding(binding)
        return outs
