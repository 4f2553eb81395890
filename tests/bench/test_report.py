"""Report files: well-formed Markdown, JSON, PNGs and a self-contained HTML whose plots render in Chromium."""
import re
import shutil
import subprocess
from html.parser import HTMLParser

import effattn

PNG = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "link", "input"}


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
