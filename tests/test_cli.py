import subprocess
import sys

import effattn
from effattn.cli import main


def test_list_shows_every_method(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for m in effattn.methods():
        assert m.name in out
    assert "O(N^2 d)" in out and "KV cache / state" in out


def test_list_markdown(capsys):
    assert main(["list", "--markdown"]) == 0
    assert capsys.readouterr().out.startswith("| name | class |")


def test_check_one_method(capsys):
    assert main(["check", "--method", "mqa"]) == 0
    out = capsys.readouterr().out
    assert "mqa" in out and "pass" in out and "all passed" in out


def test_check_unknown_method_is_an_error(capsys):
    assert main(["check", "--method", "flashh"]) == 2
    assert "unknown method 'flashh'" in capsys.readouterr().err


def test_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "effattn", "list"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "standard" in res.stdout


def test_readme_method_table_is_the_registry(capsys):
    """The README's method table is `effattn list --markdown`: regenerate it when a method is added."""
    from pathlib import Path

    assert main(["list", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert table in readme
