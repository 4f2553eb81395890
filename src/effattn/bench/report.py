"""The report of a run in three forms from the same tables: terminal, Markdown (report.md + PNGs) and one
self-contained HTML file (report.html, figures inlined as data URIs)."""
from __future__ import annotations

import base64
import html
from pathlib import Path

STATUS_SHORT = {"timeout": "TIMEOUT", "oom": "OOM", "error": "ERROR", "skipped": "-", "budget": "(budget)"}


def _num(x, fmt="{:.3g}") -> str:
    return "" if x is None else fmt.format(x)


def _fastest_anchor(data: dict) -> dict[tuple, tuple[str, float]]:
    """(mode, N) -> (name, time) of the fastest exact softmax anchor."""
    best: dict[tuple, tuple[str, float]] = {}
    for r in data["records"]:
        if r["kind"] == "anchor" and r["status"] == "ok" and r.get("exact"):
            key = (r["mode"], r["n"])
            if key not in best or r["time_s"] < best[key][1]:
                best[key] = (r["name"], r["time_s"])
    return best


def mode_table(data: dict, mode: str) -> tuple[list[str], list[list[str]]]:
    """One row per subject: time at every N, then throughput, memory, error and ratio at its largest N."""
    ns = data["config"]["seq_lens"]
    fastest = _fastest_anchor(data)
    rows: dict[str, dict] = {}
    for r in data["records"]:
        if r["mode"] == mode:
            rows.setdefault(r["label"], {})[r["n"]] = r
    rate = "KV GB/s" if mode == "decode" else "TFLOP/s"  # decoding is bound by reading the cache
    headers = ["method", "class"] + [f"N={n} ms" for n in ns] + ["Mtok/s", rate, "MiB", "rel L2",
                                                                  "vs fastest anchor", "notes"]
    out = []
    for label, by_n in rows.items():
        ok = [r for r in by_n.values() if r["status"] == "ok"]
        last = max(ok, key=lambda r: r["n"]) if ok else None
        anyr = next(iter(by_n.values()))
        cls = anyr["family"]
        cells = []
        for n in ns:
            r = by_n.get(n)
            if r is None:
                cells.append("")
            elif r["status"] == "ok":
                cells.append(_num(r["time_s"] * 1e3))
            else:
                budget = r["status"] == "skipped" and "run budget" in r.get("reason", "")
                cells.append(STATUS_SHORT["budget" if budget else r["status"]])
        if last is None:
            reasons = sorted({r.get("reason", "")[:70] for r in by_n.values()})
            out.append([label, cls] + cells + ["", "", "", "", "", "; ".join(reasons)])
            continue
        ref = fastest.get((mode, last["n"]))
        vs = "" if ref is None or (last["kind"] == "anchor" and ref[0] == last["name"]) else \
            f"{ref[1] / last['time_s']:.2f}x {ref[0]}"
        notes = [f"@N={last['n']}"] + list(last.get("notes") or [])
        if last.get("cosine") is not None:
            notes.append(f"cos {last['cosine']:.4f}")
        rate_value = last.get("bytes_per_s", 0) / 1e9 if mode == "decode" else last.get("tflops")
        out.append([label, cls] + cells + [_num(last["tokens_per_s"] / 1e6), _num(rate_value),
                                           _num(last["peak_bytes"] / 2**20), _num(last.get("rel_l2"), "{:.2e}"),
                                           vs, "; ".join(notes)])
    return headers, out


def fit_table(data: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["method", "mode", "N range", "time slope", "claimed", "time verdict", "memory slope", "claimed",
               "memory verdict"]
    rows = [[f["label"], f["mode"], f"{f['n_min']}-{f['n_max']} ({f['points']})", _num(f["time_slope"], "{:.2f}"),
             _num(f["claimed_time"], "{:g}"), f["time_verdict"], _num(f["memory_slope"], "{:.2f}"),
             _num(f["claimed_memory"], "{:g}"), f["memory_verdict"]]
            for f in data.get("fits", []) if f["kind"] == "method"]
    return headers, rows


def failure_table(data: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[r["label"], r["mode"], str(r["n"]), r["status"], r.get("reason", "")]
            for r in data["records"] if r["status"] in ("timeout", "oom", "error")]
    return ["method", "mode", "N", "status", "reason"], rows


def caveats(data: dict) -> list[str]:
    cfg, dev = data["config"], data["device"]
    out = []
    if dev["type"] == "cpu":
        out.append("CPU run at tiny sizes: fixed per-call costs (Python, dispatch, Triton's interpreter for "
                   "kernel methods) dominate, so times say little about GPU speed, and fitted slopes are noisy "
                   "and usually below the claimed exponents. Only a slope *above* its claim is a real warning.")
        out.append("CPU peak memory is the allocator's peak during one call (the profiler's memory events): "
                   "outputs, saved tensors and temporaries, not the inputs; the numpy buffers of Triton's "
                   "interpreter are not counted.")
    else:
        out.append("Peak memory is torch.cuda.max_memory_allocated during one call minus what was allocated "
                   "before it (the inputs).")
    out.append(f"Times are medians ({'triton.testing.do_bench' if dev['type'] == 'cuda' else 'torch.utils.benchmark'}) "
               f"after a warm-up; per-cell limit {cfg['time_limit']:g} s. Slopes use time and memory per "
               "sequence (divided by B) and are flagged when more than 0.5 away from the claim.")
    out.append("Anchors run causal (the registry's usual default) on plain q, k, v with H key/value heads; "
               "'vs fastest anchor' is the fastest exact anchor's time over the method's (above 1: faster), "
               "whatever the method's own mask.")
    out.append("Errors (rel L2, cosine) are against exact softmax attention on the same random Gaussian inputs, "
               "whose attention is spread over all keys: a worst case for sparse and low-rank approximations.")
    out.append("Claimed exponents are the registry's, one per method; a form such as a masked-quadratic "
               "'parallel' form of a recurrence can legitimately exceed them.")
    out.append("FLOPs: softmax-type methods and anchors 4·B·H·T·S·D (halved when causal), fwd+bwd 3.5x fwd; "
               "linear recurrences 4·B·T·(state size), fwd+bwd 3x; other methods report tokens/s only.")
    for ahead in data.get("compile_ahead", []):
        cut = f"; cut off at its deadline: {', '.join(ahead['unfinished'])}" if ahead.get("unfinished") else ""
        out.append(f"Compiled ahead: {ahead['done']} of {ahead['units']} subjects in {ahead['seconds']:.0f} s by "
                   f"{ahead['jobs']} worker processes, within the budget{cut}; the first call of the rest compiled "
                   f"in its own cell.")
    if not data.get("complete"):
        out.append("This run is INCOMPLETE (interrupted, or its --budget ran out); `effattn bench --resume "
                   "--out DIR` continues it.")
    return out


def _sections(data: dict):
    """(title, headers, rows) of every table, in report order."""
    for mode in data["config"]["modes"]:
        h, rows = mode_table(data, mode)
        if rows:
            yield f"{mode}: time per call and results at the largest N each method reached", h, rows
    h, rows = fit_table(data)
    yield "Measured complexity (slopes of log time and log memory vs log N) against the registry's claims", h, rows
    h, rows = failure_table(data)
    if rows:
        yield "Failures (the run went on)", h, rows


def _header_lines(data: dict) -> list[str]:
    dev, v, cfg = data["device"], data["versions"], data["config"]
    anchors = ", ".join(f"{k} ({s})" for k, s in data["anchors"].items()) or "none requested"
    return [f"date: {data['updated']}", f"device: {dev['type']} {dev.get('name', '')} ({dev.get('threads')} threads)",
            "versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
            f"command: {data['command']}",
            f"sizes: N in {cfg['seq_lens']}, B={cfg['batch'] or 'tokens/N'}, H={cfg['heads']}, D={cfg['head_dim']}, "
            f"{cfg['dtype']}, modes {cfg['modes']}",
            f"anchors: {anchors}"]


def terminal_report(data: dict) -> str:
    from ..cli import format_table

    parts = ["effattn bench  " + "\n".join(_header_lines(data)[:2])]
    for title, h, rows in _sections(data):
        parts += ["", title, format_table(h, rows) if rows else "(none)"]
    parts += [""] + [f"note: {c}" for c in caveats(data)]
    return "\n".join(parts)


def _md_cell(x: str) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def markdown_report(data: dict, figures: list[tuple[str, Path]]) -> str:
    lines = ["# effattn bench report", ""] + [f"- {ln}" for ln in _header_lines(data)] + [""]
    lines += [f"> {c}" for c in caveats(data)] + [""]
    for title, h, rows in _sections(data):
        lines += [f"## {title}", "", "| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
        lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows] + [""]
    lines += ["## Figures", ""] + ([f"![{cap}]({p.name})" for cap, p in figures] or [NO_PLOTS]) + [""]
    return "\n".join(lines)


HTML_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#eee}td{text-align:right}td:first-child,td:nth-child(2){text-align:left}
.note{background:#fff8e0;padding:.4em .8em;border-left:4px solid #e0b000;margin:.3em 0}
figure{display:inline-block;margin:.5em}img{max-width:100%}"""
HTML_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.plot'), ok = 0;
  imgs.forEach(function (im) { var good = im.complete && im.naturalWidth > 0; im.dataset.rendered = good; if (good) ok++; });
  document.getElementById('plot-status').textContent = 'plots rendered: ' + ok + '/' + imgs.length;
});
</script>"""


def html_report(data: dict, figures: list[tuple[str, Path]]) -> str:
    e = html.escape
    body = ["<h1>effattn bench report</h1>", "<ul>"] + [f"<li>{e(ln)}</li>" for ln in _header_lines(data)] + ["</ul>"]
    body += [f'<p class="note">{e(c)}</p>' for c in caveats(data)]
    body.append('<p id="plot-status">plots rendered: (script did not run)</p><h2>Figures</h2>')
    if not figures:
        body.append(f"<p>{e(NO_PLOTS)}</p>")
    for cap, p in figures:
        uri = "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()
        body.append(f'<figure><img class="plot" alt="{e(cap)}" src="{uri}"><figcaption>{e(cap)}</figcaption></figure>')
    for title, h, rows in _sections(data):
        body.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(x)}</th>" for x in h) + "</tr>")
        body += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows]
        body.append("</table>")
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>effattn bench report</title>"
            f"<style>{HTML_STYLE}</style></head><body>\n" + "\n".join(body) + f"\n{HTML_CHECK}\n</body></html>\n")


NO_PLOTS = ("No plots: matplotlib is not installed here (`pip install matplotlib`, then `effattn bench "
            "--report-only --out DIR` rewrites the reports from results.json).")


def write_reports(data: dict, out_dir) -> dict[str, Path]:
    """report.md, report.html, the PNGs and summary.txt (the terminal table) into `out_dir`."""
    out = Path(out_dir)
    try:
        from .plots import make_plots

        figures = make_plots(data, out)
    except ImportError:  # a GPU image without matplotlib still gets its tables
        figures = []
    paths = {"markdown": out / "report.md", "html": out / "report.html", "summary": out / "summary.txt"}
    paths["markdown"].write_text(markdown_report(data, figures))
    paths["html"].write_text(html_report(data, figures))
    paths["summary"].write_text(terminal_report(data) + "\n")
    return {**paths, **{cap: p for cap, p in figures}}
