"""The report's figures (matplotlib, Agg): time and memory against N on log-log axes, one line per method
(one panel per survey class, anchors in each) for each mode, and error against speed for the methods that
approximate softmax attention."""
from __future__ import annotations

from pathlib import Path

from .fit import length

LINESTYLES = ("-", "--", "-.", ":")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict], mode: str, value) -> dict[str, tuple[list, list, str, str]]:
    """label -> (lengths, values, kind, family) of the ok cells of `mode` (lengths actually run)."""
    out: dict[str, tuple[list, list, str, str]] = {}
    for r in sorted(records, key=length):
        if r["mode"] == mode and r["status"] == "ok":
            y = value(r)
            if y is not None and y > 0:
                xs, ys, _, _ = out.setdefault(r["label"], ([], [], r["kind"], r["family"]))
                xs.append(length(r))
                ys.append(y)
    return out


def _line_plot(plt, series, title: str, ylabel: str, path: Path) -> None:
    """One panel per survey class (anchors, in black, repeated in each), so 50 lines stay readable."""
    families = sorted({fam for _, _, kind, fam in series.values() if kind == "method"}) or ["(none)"]
    fig, axes = plt.subplots(len(families), 1, figsize=(10, 3.4 * len(families)), dpi=90, squeeze=False)
    cmap = plt.get_cmap("tab20")
    anchors = {k: v for k, v in sorted(series.items()) if v[2] == "anchor"}
    for ax, family in zip(axes[:, 0], families):
        mine = {k: v for k, v in sorted(series.items()) if v[2] == "method" and v[3] == family}
        for i, (label, (xs, ys, _, _)) in enumerate(anchors.items()):
            ax.plot(xs, ys, color="black", linestyle=LINESTYLES[i % 4], marker="x", linewidth=1.0,
                    label=f"{label} (anchor)")
        for i, (label, (xs, ys, _, _)) in enumerate(mine.items()):
            ax.plot(xs, ys, color=cmap(i % 20), linestyle=LINESTYLES[(i // 20) % 4], marker="o", markersize=3,
                    linewidth=1.5, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {family}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if mine or anchors:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + (len(mine) + len(anchors)) // 16)
        else:
            ax.text(0.5, 0.5, "no successful cells", ha="center", va="center", transform=ax.transAxes)
    axes[-1, 0].set_xlabel("sequence length N")
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _scatter(plt, records: list[dict], path: Path) -> None:
    """Relative L2 error against time per sequence, at the largest N each approximation ran (fwd, else decode)."""
    best: dict[str, dict] = {}
    for r in records:
        if r["status"] == "ok" and r.get("rel_l2") is not None and r["mode"] in ("fwd", "decode"):
            cur = best.get(r["label"])
            if cur is None or (r["mode"] == "fwd", r["n"]) > (cur["mode"] == "fwd", cur["n"]):
                best[r["label"]] = r
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    for label, r in sorted(best.items()):
        x, y = r["time_s"] / r["batch"] * 1e3, max(r["rel_l2"], 1e-12)
        ax.scatter([x], [y], marker="x" if r["kind"] == "anchor" else "o")
        ax.annotate(f"{label} ({r['mode']}, N={r['n']})", (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("time per sequence (ms)")
    ax.set_ylabel("relative L2 error vs exact softmax attention")
    ax.set_title("error vs speed (methods that approximate softmax attention)")
    ax.grid(True, which="both", alpha=0.3)
    if not best:
        ax.set_xscale("linear")
        ax.set_yscale("linear")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no approximating method measured in this run", ha="center", va="center",
                transform=ax.transAxes)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def make_plots(data: dict, out_dir: Path) -> list[tuple[str, Path]]:
    """Write the PNGs into `out_dir`; return (caption, path) for each, in report order."""
    plt = _pyplot()
    out = []
    modes = [m for m in data["config"]["modes"] if any(r["mode"] == m for r in data["records"])]
    for mode in modes:
        p = out_dir / f"time_vs_n_{mode}.png"
        _line_plot(plt, _series(data["records"], mode, lambda r: r["time_s"] / r["batch"] * 1e3),
                   f"time per sequence, {mode} (log-log)", "ms per sequence", p)
        out.append((f"Time vs N ({mode})", p))
        p = out_dir / f"memory_vs_n_{mode}.png"
        _line_plot(plt, _series(data["records"], mode, lambda r: (r.get("peak_bytes") or 0) / r["batch"] / 2**20),
                   f"peak working memory per sequence, {mode} (log-log)", "MiB per sequence", p)
        out.append((f"Memory vs N ({mode})", p))
    p = out_dir / "error_vs_speed.png"
    _scatter(plt, data["records"], p)
    out.append(("Error vs speed", p))
    return out
