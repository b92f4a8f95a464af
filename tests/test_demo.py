"""The built-in demo, shortened to seconds: videos → frames → training → evaluation → report + picture."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    demo = load_demo()
    assert demo.main(["--out", str(tmp_path / "demo"), "--quick"]) == 0
    out = capsys.readouterr().out
    for label in ("mean pooling", "TDB", "TDB + TAB", "CLIP-ViP proxies"):
        row = next(line for line in out.splitlines() if line.startswith(label + " ") and "%" in line)
        acc = float(re.search(r"([\d.]+)%", row).group(1))
        assert 0.0 <= acc <= 100.0
    report = (tmp_path / "demo" / "report.md").read_text()
    assert report.count("| mean pooling |") == 1 and "direction acc" in report
    png = tmp_path / "demo" / "retrieval_tab_tdb.png"
    with Image.open(png) as im:
        assert im.size[0] > 500 and im.size[1] > 300
    # every variant left a checkpoint selected on the validation split and its test metrics
    for v in ("meanP", "tdb", "tab_tdb", "vip"):
        assert (tmp_path / "demo" / "runs" / v / "best.pt").is_file()
        assert (tmp_path / "demo" / "runs" / v / "test_metrics.json").is_file()
