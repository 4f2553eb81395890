"""The state-carrying layers of the quality harness on their fast kernels vs the same layers in float64.

    PYTHONPATH=src python3 benchmarks/layer_check.py --out DIR [--layers retnet,gla] [--widths 64,256] [--seq 64,256]

For each layer (an `effattn.nn.make_mixer` name) and width, with 2 heads as in `effattn quality`: the layer
runs forward and backward in float32 through its registered fast op (the Triton kernels on a GPU), and a
float64 copy of it runs the engine's plain-PyTorch chunk form (`effattn.nn.recurrence`'s fallback). It
reports the relative L2 error of the output, of dx and of the worst parameter gradient, and the seconds of
the first call (compiles included). A learning failure at one width with errors near float32's resolution
here is the recipe's, not the kernels'. Results go to DIR/layer_check.json after every case.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import time

import torch

import effattn  # noqa: F401  (registers every method)
import effattn.nn.recurrence as recurrence
from effattn.nn import make_mixer


@contextlib.contextmanager
def chunk_form_only():
    """Within: every layer runs the plain-PyTorch chunk form, never a registered op."""
    usable = recurrence._usable
    recurrence._usable = lambda *args, **kwargs: False
    try:
        yield
    finally:
        recurrence._usable = usable


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).norm() / want.detach().norm().clamp_min(1e-30))


def check(name: str, width: int, seq: int, batch: int, device: str) -> dict:
    torch.manual_seed(0)
    layer = make_mixer(name, width, 2).to(device)
    ref = copy.deepcopy(layer).double()
    x = torch.randn(batch, seq, width, device=device, requires_grad=True)
    x64 = x.detach().double().requires_grad_(True)
    start = time.perf_counter()
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    with chunk_form_only():
        y64 = ref(x64)
        y64.backward(dy.double())
    grads = [(n, relative(p.grad, p64.grad)) for (n, p), p64 in zip(layer.named_parameters(), ref.parameters())
             if p64.grad is not None]
    worst = max(grads, key=lambda t: t[1])
    return {"out": relative(y, y64), "dx": relative(x.grad, x64.grad), "worst_param": worst[0],
            "worst_param_err": worst[1], "finite": bool(torch.isfinite(y).all()), "first_call_s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", default="retnet,gla,deltanet,gated_deltanet,mamba2")
    ap.add_argument("--widths", default="64,256")
    ap.add_argument("--seq", default="64,256")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    results = []
    for name in a.layers.split(","):
        for width in (int(w) for w in a.widths.split(",")):
            for seq in (int(t) for t in a.seq.split(",")):
                try:
                    row = check(name, width, seq, a.batch, a.device)
                except Exception as e:  # noqa: BLE001  (one failing layer must not hide the others)
                    row = {"error": repr(e)[-400:]}
                results.append({"layer": name, "width": width, "seq": seq, **row})
                print(results[-1], flush=True)
                with open(os.path.join(a.out, "layer_check.json"), "w") as f:
                    json.dump({"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device,
                               "torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
