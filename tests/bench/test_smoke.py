"""One tiny run through every registered method, form and mode (with the CPU anchors), then everything
that reads it: records, schema, report files, the HTML in headless Chromium, advise. One file, so that
pytest-xdist's --dist loadfile runs the smoke once."""
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

import effattn
from effattn.bench import run_bench
from effattn.bench.advise import TIERS, advise
from effattn.bench.results import RESULTS_FILE, load, validate
from effattn.cli import main

LEGIT_SKIPS = ("no backward", "no decode support", "make_inputs drew")
PNG = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "link", "input"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("bench-smoke")
    log = io.StringIO()
    data = run_bench(tiny(), out, command="pytest smoke", stream=log)
    return data, out, log.getvalue()


def test_smoke_every_method_every_mode(smoke):
    data, out, log = smoke
    assert data["complete"] and validate(data) == []
    seen = {(r["name"], r["form"], r["mode"]) for r in data["records"] if r["kind"] == "method"}
    for m in effattn.methods():
        for form in m.forms:
            for mode in ("fwd", "fwdbwd", "decode"):
                assert (m.name, form, mode) in seen, (m.name, form, mode)
    for r in data["records"]:
        assert r["status"] in ("ok", "skipped"), (r["label"], r["mode"], r["status"], r["reason"])
        if r["status"] == "skipped":
            assert any(s in r["reason"] for s in LEGIT_SKIPS), r
        else:
            assert r["time_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_bytes"] > 0
    fwd = [r for r in data["records"] if r["mode"] == "fwd" and r["kind"] == "method"]
    assert all(r["status"] == "ok" for r in fwd), [r["reason"] for r in fwd if r["status"] != "ok"]
    for r in fwd:  # derived from the registry alone: FLOPs where the family defines them, error where approximating
        meta = data["methods"][r["name"]]
        assert ("rel_l2" in r) == meta["approximates_softmax"]
        if meta["family"] == "baseline":
            assert r["flops"] == pytest.approx(2 * r["batch"] * r["heads"] * 16 * 16 / 2 * 2 * r["head_dim"])
        if meta["family"] == "linear":
            assert r["flops"] > 0 and r["tflops"] > 0
    std = next(r for r in fwd if r["name"] == "standard")
    assert std["causal"] is True and set(std["vs_anchors"]) == {"sdpa_math", "sdpa_flash"}
    assert data["anchors"]["sdpa_math"] == "available" and data["anchors"]["flex"].startswith("unavailable")
    assert "elapsed" in log and "eta" in log


def test_decode_is_one_token_against_the_cache(smoke):
    data, _, _ = smoke
    dec = [r for r in data["records"] if r["mode"] == "decode" and r["status"] == "ok" and r["kind"] == "method"]
    assert dec
    for r in dec:
        assert r["seq_q"] == 1 and r["tokens_per_s"] == pytest.approx(r["batch"] / r["time_s"])
        assert r["bytes_per_s"] > 0
        if r["cache_per_token"]:
            assert r["seq_k"] == 16


def test_results_json_schema(smoke):
    data, out, _ = smoke
    loaded = load(out / RESULTS_FILE)
    assert loaded["schema"] == "effattn.bench/1" and loaded["schema_version"] == 1
    assert loaded["device"]["type"] == "cpu" and loaded["versions"]["torch"] == torch.__version__
    assert loaded["command"] == "pytest smoke" and loaded["config"]["seq_lens"] == [16]
    bad = json.loads(json.dumps(loaded))
    bad["records"][0].pop("time_s")
    bad["records"][1]["status"] = "exploded"
    bad["schema_version"] = 99
    problems = validate(bad)
    assert any("time_s" in p for p in problems) and any("exploded" in p for p in problems)
    assert any("schema" in p for p in problems)
    assert validate([]) == ["top level must be an object, got list"]
    (out / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(out / "broken.json")
    with pytest.raises(ValueError, match="does not exist"):
        load(out / "missing.json")


class _Checker(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.imgs, self.external = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if attrs.get(key, "").startswith(("http:", "https:", "//", "file:")):
                self.external.append(attrs[key])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")


def test_report_files_well_formed(smoke):
    data, out, _ = smoke
    md = (out / "report.md").read_text()
    assert md.startswith("# effattn bench report")
    table_rows = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert table_rows
    for block in re.split(r"\n(?!\|)", md):
        rows = [ln for ln in block.splitlines() if ln.startswith("|")]
        widths = {len(re.findall(r"(?<!\\)\|", ln)) for ln in rows}
        assert len(widths) <= 1, block[:200]
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(figures) == 2 * 3 + 1  # time and memory per mode, error vs speed
    for name in figures:
        assert (out / name).read_bytes().startswith(PNG)
    summary = (out / "summary.txt").read_text()
    for m in effattn.methods():
        assert m.name in summary and m.name in md
    checker = _Checker()
    checker.feed((out / "report.html").read_text())
    assert not checker.errors and not checker.stack and not checker.external
    assert len(checker.imgs) == len(figures) and all(s.startswith("data:image/png;base64,") for s in checker.imgs)


def _chromium(tmp_path, *args):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is needed for this test (Debian: apt-get install -y chromium; `make test` does it)"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_html_plots_render_in_headless_chromium(smoke, tmp_path):
    import matplotlib.image

    _, out, _ = smoke
    url = (out / "report.html").resolve().as_uri()
    dom = _chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", url)
    n = 2 * 3 + 1
    assert f"plots rendered: {n}/{n}" in dom.stdout, (dom.stdout[-500:], dom.stderr[-2000:])
    assert dom.stdout.count('data-rendered="true"') == n
    shot = tmp_path / "shot.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1300,2400", "--hide-scrollbars", url)
    assert shot.exists(), res.stderr[-2000:]
    img = matplotlib.image.imread(shot)[..., :3]
    non_white = (img < 0.95).any(axis=-1).mean()
    colourful = (img.max(axis=-1) - img.min(axis=-1) > 0.25).mean()  # plot markers and lines, not text
    colours = len({tuple(p) for p in (img.reshape(-1, 3)[::7] * 31).round().astype(int).tolist()})
    assert non_white > 0.02 and colourful > 0.0003 and colours > 64, (non_white, colourful, colours)


def test_reports_without_matplotlib(smoke, tmp_path, monkeypatch):
    import builtins

    from effattn.bench.report import write_reports

    data, _, _ = smoke
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(__import__("sys").modules, "effattn.bench.plots", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    paths = write_reports(data, tmp_path)
    assert "No plots: matplotlib is not installed" in paths["markdown"].read_text()
    assert "<img" not in paths["html"].read_text() and not list(tmp_path.glob("*.png"))
def test_advise_from_the_smoke_run(smoke, capsys):
    data, out, _ = smoke
    for task in ("prefill", "train", "decode"):
        assert main(["advise", "--seq-len", "64", "--task", task, "--results", str(out / "results.json")]) == 0
        text = capsys.readouterr().out
        tiers = re.findall(r"^\s*\d+\. \[([a-z ]+)\]", text, flags=re.M)
        assert tiers[0] == "exact" and "extrapolated from N=16" in text.splitlines()[1]
        assert [TIERS.index(t) for t in tiers] == sorted(TIERS.index(t) for t in tiers)
    ranked = advise(data, 16, "prefill", memory_gib=1e-9)
    assert all(e["tier"] == "does not fit" for e in ranked)


