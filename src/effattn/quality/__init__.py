"""Quality harness: what an approximation costs, measured on small trained tasks (survey's "quality").

    effattn quality --task mqar --methods standard,gla,deltanet --out results/

`tasks` holds the data generators (MQAR, selective copying, induction heads, stdlib bytes), `train` the
one recipe every method gets, `harness` the sweep, the JSON and the plot. Only the public API is used:
models are `effattn.models.TinyLM` around `effattn.nn` layers, so a newly registered method is measured
by naming it.
"""
from .harness import PRESETS, TASKS, TaskConfig, run_one, sweep
from .tasks import induction, mqar, selective_copy, stdlib_bytes
from .train import Recipe, evaluate, train

__all__ = ["PRESETS", "TASKS", "TaskConfig", "run_one", "sweep", "induction", "mqar", "selective_copy",
           "stdlib_bytes", "Recipe", "evaluate", "train"]
