"""kk report renders one offline HTML page with real, non-trivial figures, from CSV/JSON only."""

from __future__ import annotations

import base64
import re
import subprocess
import sys

from conftest import REPO, run_cli


def test_report_renders_tables_and_figures(tiny_run, tiny_project, tmp_path):
    out = tmp_path / "r" / "report.html"
    r = run_cli("report", "--run", tiny_run, "--out", out)
    assert r.exit_code == 0, r.output
    page = out.read_text()
    for heading in ("Out-of-fold results", "Ensemble calibration (cross-fitted)", "Learning curves", "Truncation",
                    "Calibration and errors: tiny"):
        assert heading in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch: viewable offline
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == 3
    for b64 in images:
        png = base64.b64decode(b64)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000  # a drawn figure, not an empty canvas
    # the per-fold rows and the overall row are there, with the run's own numbers
    import json

    m = json.loads((tiny_run / "fold_1" / "metrics.json").read_text())
    assert f"{m['val_log_loss']:.4f}" in page and "<td>all</td>" in page
    r = run_cli("report", "--run", tiny_run, "--out", out)
    assert r.exit_code == 1 and "--force" in r.stderr


def test_report_loads_no_model_library(tiny_run, tmp_path):
    code = ("import sys; from kagglekit.report import build_report; "
            f"build_report([{str(tiny_run)!r}], {str(tmp_path / 'r.html')!r}); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"
