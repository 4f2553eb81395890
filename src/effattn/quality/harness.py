"""The quality sweep: every method trained with the same recipe and seeds on a task, evaluated on a grid.

One run = (method, width): a `TinyLM` trained on a mixture of the task's training settings, then
evaluated on every evaluation setting (longer sequences, more key-value pairs) with a fixed, seeded
evaluation set. Each run also records the model's decoding memory at each evaluation length (KV cache
or recurrent state, counted from the layers' own `step` caches), so accuracy can be read against state
size. Results: one JSON file and one PNG per task.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from ..models import TinyLM
from . import tasks
from .train import Progress, Recipe, evaluate, train

TASKS = ("mqar", "copy", "induction", "lm")


@dataclass(frozen=True)
class TaskConfig:
    """A task's data, model sizes and recipe. Settings are keyword arguments of the task's generator."""

    task: str
    vocab: int
    train_settings: tuple[dict, ...]
    eval_settings: tuple[dict, ...]
    widths: tuple[int, ...]
    recipe: Recipe
    layers: int = 2
    heads: int = 2
    eval_examples: int = 256
    seed: int = 0
    mixer_options: dict = field(default_factory=dict)
    # Peak learning rates to sweep, each (method, width) trained at every one, the best reported (Zoology's
    # protocol: one rate does not suit every method and width); empty: recipe.lr only.
    lrs: tuple[float, ...] = ()

    def sweep_lrs(self) -> tuple[float, ...]:
        return self.lrs or (self.recipe.lr,)


def _kv(pairs):
    return tuple({"seq_len": t, "num_kv_pairs": p} for t, p in pairs)


# CPU: small enough that the default sweep ends in minutes on two cores; MQAR's vocabulary shrinks to 256
# there, because with Zoology's 8192 no model leaves chance within a few hundred CPU steps (measured).
# GPU: the Zoology-scale grid (vocab 8192, sequences up to 512, up to 64 pairs, widths 64-256). MQAR's peak lr
# 1e-2: with it attention solved MQAR at widths 64 and 256 on an H200 in 2500 steps, where 3e-3 had it at 0.2
# accuracy after 1000 (benchmarks/results/quality_gpu_2026-12-04_h200*). Zoology's protocol, the best of
# several rates per run, is `--lr 1e-3,3e-3,1e-2`.
PRESETS = {
    "cpu": {
        "mqar": TaskConfig("mqar", 256, _kv([(64, 4), (64, 8)]), _kv([(64, 4), (64, 8), (128, 8), (256, 16)]),
                           (64,), Recipe(steps=800, batch=32, lr=1e-2, warmup=40)),
        "copy": TaskConfig("copy", 16, ({"seq_len": 64, "num_tokens": 8},),
                           ({"seq_len": 64, "num_tokens": 8}, {"seq_len": 128, "num_tokens": 8}),
                           (32, 64), Recipe(steps=500, batch=32, lr=3e-3, warmup=30)),
        "induction": TaskConfig("induction", 16, ({"seq_len": 64},), ({"seq_len": 64}, {"seq_len": 128}),
                                (32, 64), Recipe(steps=500, batch=32, lr=3e-3, warmup=30)),
        "lm": TaskConfig("lm", 256, ({"seq_len": 128},), ({"seq_len": 128}, {"seq_len": 256}),
                         (64,), Recipe(steps=500, batch=16, lr=3e-3, warmup=30), eval_examples=64),
    },
    "gpu": {
        "mqar": TaskConfig("mqar", 8192, _kv([(64, 4), (128, 8), (256, 16), (256, 32)]),
                           _kv([(64, 4), (128, 8), (256, 16), (512, 32), (512, 64)]),
                           (64, 128, 256), Recipe(steps=4000, batch=128, lr=1e-2, warmup=200), eval_examples=1000),
        "copy": TaskConfig("copy", 16, ({"seq_len": 256, "num_tokens": 16},),
                           ({"seq_len": 256, "num_tokens": 16}, {"seq_len": 512, "num_tokens": 16}),
                           (64, 128), Recipe(steps=3000, batch=128, lr=1e-3, warmup=200), eval_examples=1000),
        "induction": TaskConfig("induction", 16, ({"seq_len": 256},), ({"seq_len": 256}, {"seq_len": 1024}),
                                (64, 128), Recipe(steps=3000, batch=128, lr=1e-3, warmup=200), eval_examples=1000),
        "lm": TaskConfig("lm", 256, ({"seq_len": 512},), ({"seq_len": 512}, {"seq_len": 1024}),
                         (128, 256), Recipe(steps=4000, batch=32, lr=1e-3, warmup=200), eval_examples=256),
    },
}


def sampler(cfg: TaskConfig, setting: dict, corpus=None):
    """`sample(n, generator) -> (inputs, targets)` for one setting of the task."""
    generators = {"mqar": partial(tasks.mqar, vocab=cfg.vocab), "copy": partial(tasks.selective_copy, vocab=cfg.vocab),
                  "induction": partial(tasks.induction, vocab=cfg.vocab), "lm": partial(tasks.byte_windows, corpus)}
    if cfg.task not in generators:
        raise ValueError(f"task must be one of {TASKS}, got {cfg.task!r}")
    fn = partial(generators[cfg.task], **setting)
    return lambda n, generator: fn(n=n, generator=generator)


def mixture(samplers):
    """Each batch from one of the samplers, chosen by the same generator (so the order is seeded too)."""
    def sample(n, generator):
        i = int(torch.randint(len(samplers), (1,), generator=generator))
        return samplers[i](n, generator)
    return sample


def run_one(cfg: TaskConfig, method: str, width: int, device, corpora=None, progress: bool = True) -> dict:
    """Train one (method, width) model on cfg (at cfg.recipe.lr) and evaluate it on every evaluation setting."""
    train_data, val_data = corpora if corpora is not None else (None, None)
    torch.manual_seed(cfg.seed)  # same initial weights for the shared parts of every method
    model = TinyLM(cfg.vocab, width, cfg.layers, method, heads=cfg.heads, **cfg.mixer_options)
    train_sample = mixture([sampler(cfg, s, train_data) for s in cfg.train_settings])
    label = f"{method:>16} d={width:<4}" + (f" lr={cfg.recipe.lr:g}" if len(cfg.sweep_lrs()) > 1 else "")
    log = train(model, train_sample, cfg.recipe, seed=cfg.seed, device=device, label=label, progress=progress)
    evals = []
    for i, setting in enumerate(cfg.eval_settings):
        x, y = sampler(cfg, setting, val_data)(cfg.eval_examples, torch.Generator().manual_seed(10_000 + i))
        metrics = evaluate(model, x, y, cfg.recipe.batch, device)
        if cfg.task == "lm":
            metrics["bits_per_byte"] = metrics["loss"] / torch.log(torch.tensor(2.0)).item()
        metrics["state_elements"] = model.cache_elements(x[:1].to(device))
        evals.append({"setting": setting, **metrics})
    params = sum(p.numel() for p in model.parameters())
    return {"method": method, "width": width, "lr": cfg.recipe.lr, "params": params, "train": log, "eval": evals}


def environment(device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "threads": torch.get_num_threads()}
    if str(device).startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def sweep(cfg: TaskConfig, methods, device, *, budget_minutes: float | None = None, out_dir=None,
          progress: bool = True, command: str = "", isolate: bool = False, jobs: int = 1) -> dict:
    """Every method x width (x peak learning rate of cfg.lrs) of cfg with the same recipe; returns (and
    writes, with `out_dir`) the results; the reports show each (method, width) at its best rate.

    With a budget, `fit_budget` first times each run and lowers the steps of all of them alike; a run
    that still overruns its time cap stops early and says so (`train.truncated`). A run that raises is
    listed under `failed` with its error and the sweep goes on. With `isolate`, each method's probes and
    runs happen in a fresh process: a CUDA fault leaves the whole process's context unusable, so in one
    process the first faulting method would fail every method after it. `jobs` > 1 (isolated only) trains
    that many runs at once, each in its own process: tiny models leave a GPU mostly idle and their time
    goes to launches and compiles, which run on separate CPU cores. Results do not depend on it (a
    run is a fixed number of seeded steps); per-run progress bars are off then, summaries still print."""
    if jobs < 1 or (jobs > 1 and not isolate):
        raise ValueError(f"jobs must be 1, or > 1 with isolate=True (one process per run), got jobs={jobs}, "
                         f"isolate={isolate}")
    call = _in_fresh_process if isolate else _in_this_process
    runs_todo = [(m, w, lr) for m in methods for w in cfg.widths for lr in cfg.sweep_lrs()]
    failed = []
    if budget_minutes is not None:
        cfg, runs_todo, failed = fit_budget(cfg, runs_todo, device, budget_minutes * 60, progress, call, jobs)
    result = {"task": cfg.task, "config": _jsonable(asdict(cfg)), "environment": environment(device),
              "command": command, "runs": [], "failed": failed}
    overall = Progress(len(runs_todo), f"quality {cfg.task}") if progress else None
    done = 0
    for method, points, items in _each_group(call, run_one, cfg, runs_todo, device, jobs, progress and jobs == 1):
        for (width, lr), item in zip(points, items):
            if "error" in item:
                failed.append(item)
                line = f"{method:>16} d={width:<4} lr={lr:g} FAILED: {item['error']}"
            else:
                result["runs"].append(item)
                line = summary_line(item)
            if progress:
                print(line, flush=True)
        done += len(points)
        if progress:
            overall.update(done, force=True)
        if out_dir is not None:  # after every method, so an interrupted sweep keeps what it measured
            write(result, out_dir, with_plot=False)
    return result


def _corpora(cfg: TaskConfig):
    return tasks.stdlib_bytes() if cfg.task == "lm" else None


def _with_lr(cfg: TaskConfig, lr: float) -> TaskConfig:
    return cfg if lr == cfg.recipe.lr else replace(cfg, recipe=replace(cfg.recipe, lr=lr))


def _each_point(work, cfg: TaskConfig, method: str, points, device, *extra) -> list:
    """`work(cfg at lr, method, width, device, corpora, *extra)` (`run_one` or `seconds_per_step`) at each
    (width, lr) of `points`; a point that raises gives its failure record instead."""
    corpora, out = _corpora(cfg), []
    for width, lr in points:
        try:
            out.append(work(_with_lr(cfg, lr), method, width, device, corpora, *extra))
        except Exception as e:  # noqa: BLE001  (one broken method must not cost the others' results)
            out.append(_failure(method, width, lr, e))
    return out


def _each_group(call, work, cfg: TaskConfig, runs, device, jobs: int, *extra):
    """(method, points, `call(work, cfg, method, points, device, *extra)`) for each group of `runs`
    (method, width, lr), in order, with points the group's (width, lr): one group per method (all its
    points in one call), or with `jobs` > 1 one per run, `jobs` calls at once (each `call` waits on its
    own process)."""
    import concurrent.futures

    if jobs > 1:
        groups = [(m, [(w, lr)]) for m, w, lr in runs]
    else:
        groups = [(m, [(w, lr) for n, w, lr in runs if n == m]) for m in dict.fromkeys(r[0] for r in runs)]
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        results = pool.map(lambda group: call(work, cfg, *group, device, *extra), groups)
        for (method, points), items in zip(groups, results):
            yield method, points, items


def _in_this_process(work, cfg, method, points, device, *extra):
    return _each_point(work, cfg, method, points, device, *extra)


def _in_fresh_process(work, cfg, method, points, device, *extra):
    """`_each_point` in a newly spawned Python process (its own CUDA context); results come back pickled."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_each_point, work, cfg, method, points, device, *extra).result()
        except concurrent.futures.process.BrokenProcessPool as e:  # the process died (e.g. a segfault)
            return [_failure(method, w, lr, e) for w, lr in points]


def seconds_per_step(cfg: TaskConfig, method: str, width: int, device, corpora=None) -> float:
    """Measured training time per step of one (method, width) model: the mean over the training settings
    of one step each, after a warm-up step at each. Every setting is its own shape, and a kernel compiles
    and tunes once per shape: timing the first step of a shape measures that, not training (on an H200,
    700-1500 ms against tens of ms)."""
    model = TinyLM(cfg.vocab, width, cfg.layers, method, heads=cfg.heads, **cfg.mixer_options)
    samplers = [sampler(cfg, s, (corpora or (None, None))[0]) for s in cfg.train_settings]
    one_step = replace(cfg.recipe, steps=1, warmup=1, time_limit_s=None)
    seconds = 0.0
    for timed in (False, True):
        for sample in samplers:
            log = train(model, sample, one_step, seed=cfg.seed, device=device, progress=False)
            seconds += log["seconds"] if timed else 0.0
    return seconds / len(samplers)


def fit_budget(cfg: TaskConfig, runs, device, budget_s: float, progress: bool = True, call=_in_this_process,
               jobs: int = 1):
    """Scale every run's steps down by one factor so the sweep fits the budget: the recipe stays the same
    for all methods. Each run also gets a hard time cap (its share of the budget); a run that still hits
    it stops early and records `truncated`. Returns the scaled config, the runs that could be timed and
    the failures of those that raised. `call` runs each method's probes (`sweep`'s isolation), `jobs` of
    them at once; step times are then measured under the same concurrency as the training. The learning
    rate does not change a step's time: each (method, width) is probed once, at cfg.recipe.lr."""
    step_of, failed = {}, []
    start = time.perf_counter()
    pairs = [(m, w, cfg.recipe.lr) for m, w in dict.fromkeys((m, w) for m, w, _ in runs)]
    for method, points, items in _each_group(call, seconds_per_step, cfg, pairs, device, jobs):
        for (width, _), t in zip(points, items):
            if isinstance(t, dict):
                failed += [dict(t, lr=lr) for m, w, lr in runs if (m, w) == (method, width)]
            else:
                step_of[(method, width)] = t
    runs = [r for r in runs if r[:2] in step_of]
    per_step = [step_of[r[:2]] for r in runs]
    # The rest of the budget: evaluation, the probes themselves, and as much again for each method's start
    # (a fresh process compiles its kernels again, from Triton's disk cache when isolated).
    probe_s = time.perf_counter() - start
    usable = max(0.1 * budget_s, 0.8 * budget_s - 2 * probe_s)
    # seconds per step of the whole sweep: the work shared over `jobs` processes, but no less than the
    # slowest run; in one process, every run one after another
    sweep_step = max(sum(per_step) / jobs, max(per_step, default=0.0))
    steps = cfg.recipe.steps
    if sweep_step * steps > usable:
        steps = max(10, int(usable / sweep_step))
    if progress:
        print(f"budget {budget_s / 60:.1f} min ({probe_s:.0f} s of probes): {steps} steps per run (preset "
              f"{cfg.recipe.steps}); measured "
              + ", ".join(f"{m}/{w} {1000 * t:.0f} ms/step" for (m, w), t in step_of.items()), flush=True)
    cap = max(1.3 * max((t * steps for t in per_step), default=0.0),
              budget_s * min(jobs, len(runs)) / max(1, len(runs)) * 0.9)
    if cfg.recipe.time_limit_s is not None:  # a cap the caller set (--run-minutes) still holds if shorter
        cap = min(cap, cfg.recipe.time_limit_s)
    recipe = replace(cfg.recipe, steps=steps, warmup=min(cfg.recipe.warmup, max(1, steps // 10)), time_limit_s=cap)
    return replace(cfg, recipe=recipe), runs, failed


def _failure(method: str, width: int, lr: float, error: Exception) -> dict:
    return {"method": method, "width": width, "lr": lr, "error": f"{type(error).__name__}: {str(error)[:400]}"}


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _lr(run: dict) -> float:
    return run.get("lr", run["train"]["recipe"]["lr"])  # results written before the lr sweep lack "lr"


def _metric_key(run: dict) -> str:
    return "bits_per_byte" if "bits_per_byte" in run["eval"][0] else "accuracy"


def _mean_metric(run: dict) -> float:
    key = _metric_key(run)
    return sum(e[key] for e in run["eval"]) / len(run["eval"])


def best_runs(runs: list[dict]) -> list[dict]:
    """One run per (method, width), in first-seen order: the learning rate with the best mean metric over
    the evaluation settings (highest accuracy; lowest bits per byte for the LM task)."""
    best = {}
    for run in runs:
        key, sign = (run["method"], run["width"]), (-1 if _metric_key(run) == "bits_per_byte" else 1)
        if key not in best or sign * _mean_metric(run) > sign * _mean_metric(best[key]):
            best[key] = run
    return list(best.values())


def summary_line(run: dict) -> str:
    key = _metric_key(run)
    cells = ", ".join(f"{_setting_label(e['setting'])}: {e[key]:.3f}" for e in run["eval"])
    flag = f" (stopped at step {run['train']['steps_done']})" if run["train"]["truncated"] else ""
    return (f"{run['method']:>16} d={run['width']:<4} lr={_lr(run):g} {key}: {cells}  "
            f"[{run['train']['seconds']:.0f}s{flag}]")


def _setting_label(setting: dict) -> str:
    short = {"seq_len": "T", "num_kv_pairs": "kv", "num_tokens": "n"}
    return " ".join(f"{short.get(k, k)}={v}" for k, v in setting.items())


def merge(results: list[dict]) -> dict:
    """One result from sweeps of the same task and recipe run apart (e.g. methods split over several device
    sessions): their runs and failures together, their commands joined. Raises ValueError for sweeps that
    are not comparable: another task, data, model shape or recipe (the steps and the time cap may differ,
    and each run records its own)."""
    if not results:
        raise ValueError("merge needs at least one result")
    first = results[0]

    def comparable(r):  # what may differ: widths, learning rates, steps and the time cap
        cfg = dict(r["config"], widths=None, lrs=None, recipe=dict(r["config"]["recipe"], steps=None, lr=None,
                                                                   time_limit_s=None, warmup=None))
        return r["task"], cfg

    for r in results[1:]:
        if comparable(r) != comparable(first):
            raise ValueError(f"cannot merge a {r['task']} sweep with config {r['config']} into a {first['task']} "
                             f"sweep with config {first['config']}: task, data, model and recipe must match")
    runs = [run for r in results for run in r["runs"]]
    seen = [(run["method"], run["width"], _lr(run)) for run in runs]
    if len(seen) != len(set(seen)):
        raise ValueError(f"the same (method, width, lr) run appears in more than one result: {sorted(seen)}")
    widths = sorted({w for r in results for w in r["config"]["widths"]})
    lrs = sorted({lr for r in results for lr in (r["config"].get("lrs") or [r["config"]["recipe"]["lr"]])})
    config = dict(first["config"], widths=widths, lrs=lrs if len(lrs) > 1 else [])
    return dict(first, config=config, runs=runs,
                failed=[f for r in results for f in r.get("failed", [])],
                command=" ; ".join(r["command"] for r in results))


def write(result: dict, out_dir, with_plot: bool = True) -> tuple[Path, Path]:
    """quality_<task>.json always; .md (table) and .png (plot) with `with_plot`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"quality_{result['task']}.json", out / f"quality_{result['task']}.png"
    json_path.write_text(json.dumps(result, indent=1))
    if with_plot:
        (out / f"quality_{result['task']}.md").write_text(markdown(result))
        if result["runs"]:  # nothing to draw when every run raised
            plot(result, png_path)
    return json_path, png_path


def _steps_cell(run: dict) -> str:
    return f"{run['train']['steps_done']}" + (" (time cap)" if run["train"]["truncated"] else "")


def markdown(result: dict) -> str:
    """A Markdown table: one row per (method, width) at its best learning rate, the metric per evaluation
    setting, state size, steps, time; with several rates per row, a second table of every run's mean."""
    runs, best = result["runs"], best_runs(result["runs"])
    key = "bits_per_byte" if result["task"] == "lm" else "accuracy"
    settings = [_setting_label(e["setting"]) for e in runs[0]["eval"]] if runs else []
    env, recipe = result["environment"], result["config"]["recipe"]
    swept = len(best) < len(runs)
    rates = (f"peak lr per row, the best of {sorted({_lr(r) for r in runs})} by mean {key}" if swept
             else "peak lr per row")
    lines = [f"# quality: {result['task']}", "",
             f"`{result['command']}` on {env.get('gpu', env['device'])}, torch {env['torch']}, {env['date_utc']} UTC; "
             f"recipe: {recipe['steps']} steps, batch {recipe['batch']}, {rates}, same seed for all.", "",
             "| method | width | lr | params | " + " | ".join(f"{key} {s}" for s in settings)
             + f" | state elements ({settings[-1] if settings else ''}) | steps | seconds |",
             "|" + "---|" * (len(settings) + 7)]
    for r in best:
        cells = [f"{e[key]:.3f}" for e in r["eval"]]
        lines.append(f"| {r['method']} | {r['width']} | {_lr(r):g} | {r['params']} | " + " | ".join(cells)
                     + f" | {r['eval'][-1]['state_elements']} | {_steps_cell(r)} | {r['train']['seconds']:.0f} |")
    if swept:
        lines += ["", f"Every learning rate (mean {key} over the settings):", "",
                  f"| method | width | lr | mean {key} | steps |", "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['width']} | {_lr(r):g} | {_mean_metric(r):.3f} | {_steps_cell(r)} |"
                  for r in runs]
    failed = result.get("failed", [])
    if failed:
        lines += ["", "Runs that raised (not trained):", ""]
        lines += [f"- {f['method']} width {f['width']}" + (f" lr {f['lr']:g}" if "lr" in f else "")
                  + f": `{f['error']}`" for f in failed]
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    """Left: the metric vs evaluation setting (largest width). Right: the metric on the hardest setting vs
    the decoding state size (one point per width). Each (method, width) at its best learning rate."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lm = result["task"] == "lm"
    key = "bits_per_byte" if lm else "accuracy"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    best = best_runs(result["runs"])
    for method in dict.fromkeys(r["method"] for r in best):
        runs = sorted((r for r in best if r["method"] == method), key=lambda r: r["width"])
        widest = runs[-1]
        labels = [_setting_label(e["setting"]) for e in widest["eval"]]
        left.plot(range(len(labels)), [e[key] for e in widest["eval"]], marker="o", label=method)
        right.plot([r["eval"][-1]["state_elements"] for r in runs], [r["eval"][-1][key] for r in runs],
                   marker="o", label=method)
    left.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    left.set_title(f"{result['task']}: {key} by setting (width {widest['width']})")
    right.set_xscale("log")
    right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide on a log axis
    right.set_xlabel(f"decoding state / KV cache elements per sequence ({labels[-1]})")
    right.set_title(f"{key} vs state size, hardest setting")
    for ax in (left, right):
        ax.set_ylabel(key + (" (lower is better)" if lm else ""))
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
