"""Triton's CPU interpreter runs a `tl.associative_scan` with a user combine function one element at a time
(a Python call per element: ~1 s per [16, 16, 16] block), which made the selective-scan tests take minutes.
`enable()` swaps in the same sequential scan along the axis, vectorised over the other dimensions: the
combine function is called once per position of the scanned axis on whole slices. Same order of
combination, same results; it only touches the interpreter (compiled kernels never see it) and only
when the interpreter is on.
"""
from __future__ import annotations

import numpy as np

from .._triton_mode import interpreting


def _scan_by_slices(self, inputs):
    datas = [arg.handle.data for arg in inputs]
    take = lambda d, i: np.take(d, i, axis=self.axis)  # noqa: E731
    acc = [take(d, 0) for d in datas]
    outs = [[a] for a in acc]
    for i in range(1, datas[0].shape[self.axis]):
        prev = tuple(self.to_tensor(a, arg.dtype) for a, arg in zip(acc, inputs))
        cur = tuple(self.to_tensor(take(d, i), arg.dtype) for d, arg in zip(datas, inputs))
        ret = self.combine_fn.fn(*prev, *cur)
        acc = [r.handle.data for r in (ret if isinstance(ret, tuple) else (ret,))]
        for out, a in zip(outs, acc):
            out.append(a)
    return [self.to_tensor(np.stack(out, axis=self.axis), arg.dtype) for out, arg in zip(outs, inputs)]


def enable() -> None:
    if not interpreting():
        return
    from triton.runtime import interpreter

    interpreter.ScanOps.generic_scan = _scan_by_slices
