"""Bounds checking for Triton's CPU interpreter: every load and store a kernel makes (where its mask is true)
must fall inside the storage of one of the tensors passed to that launch.

On the GPU an out-of-bounds access is an illegal-address fault (or silently reads a neighbour's memory); the
interpreter reads raw host memory and usually goes on, so without this a kernel that indexes past its
tensors passes every CPU test. `install()` wraps the interpreter's launch, load and store.
"""
from __future__ import annotations

import numpy as np
from triton.runtime import interpreter as _interp

_ranges: list[list[tuple[int, int]]] = []  # one list of [start, end) byte ranges per launch in flight


class OutOfBounds(AssertionError):
    pass


def _check(ptrs: np.ndarray, mask: np.ndarray, itemsize: int, what: str) -> None:
    if not _ranges:
        return
    p = np.asarray(ptrs, dtype=np.uint64)
    m = np.broadcast_to(np.asarray(mask, dtype=bool), p.shape)
    live = p[m]
    if live.size == 0:
        return
    ok = np.zeros(live.shape, dtype=bool)
    for start, end in _ranges[-1]:
        ok |= (live >= start) & (live + itemsize <= end)
    if not ok.all():
        bad = int(live[~ok][0])
        near = min(_ranges[-1], key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])))
        raise OutOfBounds(f"{what} of {int((~ok).sum())} element(s) outside every tensor of the launch, first at "
                          f"{bad:#x}; nearest storage [{near[0]:#x}, {near[1]:#x}) ({bad - near[1]:+d} bytes past its end)")


def install() -> None:
    builder = _interp.InterpreterBuilder
    if getattr(builder, "_bounds_installed", False):
        return
    load, store = builder.create_masked_load, builder.create_masked_store
    init = _interp.GridExecutor._init_args_hst
    call = _interp.GridExecutor.__call__

    def masked_load(self, ptrs, mask, other, *a, **k):
        _check(ptrs.data, mask.data, np.dtype(_interp._get_np_dtype(ptrs.get_element_ty())).itemsize, "load")
        return load(self, ptrs, mask, other, *a, **k)

    def masked_store(self, ptrs, value, mask, *a, **k):
        _check(ptrs.data, mask.data, np.dtype(_interp._get_np_dtype(ptrs.get_element_ty())).itemsize, "store")
        return store(self, ptrs, value, mask, *a, **k)

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init(self, args_dev, kwargs)
        ranges = []

        def add(a):
            if isinstance(a, tuple):
                for x in a:
                    add(x)
            elif isinstance(a, _interp.TensorDescriptor):
                add(a.base)
            elif hasattr(a, "untyped_storage"):
                s = a.untyped_storage()
                ranges.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
        for a in list(args_hst) + list(kwargs_hst.values()):
            add(a)
        _ranges[-1] = ranges
        return args_hst, kwargs_hst

    def launch(self, *args, **kwargs):
        _ranges.append([])
        try:
            return call(self, *args, **kwargs)
        finally:
            _ranges.pop()

    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    _interp.GridExecutor._init_args_hst, _interp.GridExecutor.__call__ = init_args, launch
    builder._bounds_installed = True
