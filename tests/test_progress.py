"""Progress bars: on stderr, and none for a loop with nothing to do (a reused stage draws no "0/0 -:--:--" bar)."""

import pytest

from bmm_cli import progress


@pytest.fixture
def bars_on(monkeypatch):
    monkeypatch.setenv("BMM_NO_PROGRESS", "0")
    progress.set_quiet(False)


def test_track_draws_a_bar_on_stderr(bars_on, capsys):
    assert list(progress.track([1, 2, 3], "work")) == [1, 2, 3]
    out = capsys.readouterr()
    assert out.out == "" and "work" in out.err and "3/3" in out.err


def test_no_bar_for_an_empty_loop(bars_on, capsys):
    """A stage whose shards are all done (or an empty list) draws nothing."""
    assert list(progress.track([], "taskvec (3 experts)")) == []
    assert list(progress.track(iter([]), "gram free", total=0)) == []
    assert capsys.readouterr().err == ""
