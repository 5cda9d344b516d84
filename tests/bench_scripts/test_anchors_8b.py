"""bench/anchors_8b.py at 1/32 of the 8B shapes: every method and shape class runs, the route counts are the
library's, the projection counts a layer's modules, and the Ritz counter leaves the library as it found it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def anchors_8b(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import anchors_8b

    return anchors_8b


def test_scaled_run_writes_projection(anchors_8b, tmp_path, capsys):
    from bmm_cli.anchors import _spectral

    orig = _spectral._ritz
    out = tmp_path / "a.json"
    assert anchors_8b.main(["--scale", "32", "--tasks", "3", "--json", str(out), "--md", str(tmp_path / "a.md")]) == 0
    assert _spectral._ritz is orig
    res = json.loads(out.read_text())
    rows = {(r["method"], r["module"].split(".")[-1]): r for r in res["rows"]}
    assert len(rows) == 3 * 4
    assert rows[("tsv", "gate_proj")]["shape"] == [448, 128]
    # TSV tries the shortcut on every task (taken or refused), ISO-C never (it wants every direction)
    for cls in ("q_proj", "k_proj", "gate_proj", "down_proj"):
        r = rows[("tsv", cls)]
        assert r["ritz_taken"] + r["ritz_refused"] == 3
        assert rows[("iso-c", cls)]["ritz_taken"] + rows[("iso-c", cls)]["ritz_refused"] == 0
    per = {m: sum(rows[(m, c)]["cpu_s"] * n for c, n in (("q_proj", 2), ("k_proj", 2), ("gate_proj", 2),
                                                          ("down_proj", 1))) for m in ("tsv", "iso-c", "iso-cts")}
    for m, p in res["projection"].items():
        assert p["complete"]
        assert p["cpu_s_per_layer"] == pytest.approx(per[m], abs=0.1)
    assert "dimensions / 32" in (tmp_path / "a.md").read_text()
    assert "| tsv |" in capsys.readouterr().out


def test_unknown_method_is_refused(anchors_8b):
    with pytest.raises(SystemExit) as e:
        anchors_8b.main(["--methods", "svd"])
    assert e.value.code == 2
    sys.modules.pop("anchors_8b", None)
