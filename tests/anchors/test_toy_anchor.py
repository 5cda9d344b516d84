"""docs/adding-an-anchor.md's toy anchor: registered by its file's one ``register`` line, listed by the CLI, run
through the CLI's anchor stage on a tiny model and checked against its closed form; the doc shows the file as it is
and its table of anchors is the registry's."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bmm_cli.anchors import METHODS, markdown_table
from bmm_cli.store import Checkpoint

HERE = Path(__file__).resolve().parent
DOC = HERE.parents[1] / "docs" / "adding-an-anchor.md"
# the CLI with the toy anchor registered first (as a built-in's line in BUILTIN registers it when bmm starts)
LAUNCH = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import toy_anchor; from bmm_cli.cli import main; "
          "main(sys.argv[1:])")


def _bmm(*args, toy=True):
    pre = ["-c", LAUNCH, str(HERE)] if toy else ["-m", "bmm_cli.cli"]
    p = subprocess.run([sys.executable, *pre, *map(str, args)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p


def test_toy_anchor_through_the_cli_equals_its_closed_form(family, tmp_path):
    base, experts = family("bert")
    assert "toy-mean" not in METHODS  # registered only where its file is imported
    assert "toy-mean" in _bmm("anchor", "--help").stdout  # the CLI's choices follow the registry
    work, out = tmp_path / "w", tmp_path / "toy"
    _bmm("taskvec", "--base", base, "--experts", *experts, "--work", work, toy=False)
    _bmm("anchor", "--work", work, "--method", "toy-mean", "--opt", "weight=0.5", "--materialize", out, "--device",
         "cpu")
    b, es, got = Checkpoint.open(base), [Checkpoint.open(e) for e in experts], Checkpoint.open(out)
    assert set(got.keys()) == set(b.keys())
    for key in b.keys():
        w0 = b.get(key)
        if not w0.is_floating_point():
            continue
        w0 = w0.double()
        want = w0 + 0.5 * sum(e.get(key).double() - w0 for e in es) / len(es)  # the closed form, fp64
        torch.testing.assert_close(got.get(key).double(), want, rtol=1e-6, atol=1e-6, msg=key)


def test_the_doc_shows_the_toy_file_and_the_registry_table():
    doc = DOC.read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    assert code == (HERE / "toy_anchor.py").read_text(), "docs/adding-an-anchor.md: the toy file differs"
    table = doc.split("<!-- anchors:begin -->\n", 1)[1].split("<!-- anchors:end -->", 1)[0]
    assert table == markdown_table(), "docs/adding-an-anchor.md: stale table; run python -m bmm_cli.completions"


@pytest.mark.parametrize("weight", ["0", "11"])
def test_toy_options_are_checked_like_any_anchor(weight, family, tmp_path):
    base, experts = family("bert")
    p = subprocess.run([sys.executable, "-c", LAUNCH, str(HERE), "anchor", "--base", str(base), "--experts",
                        *map(str, experts), "--method", "toy-mean", "--opt", f"weight={weight}", "--materialize",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 2 and "toy-mean option weight" in p.stderr and "out of range" in p.stderr
    assert not (tmp_path / "o").exists()
