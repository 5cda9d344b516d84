"""`bmm plan` says what `bmm merge` would refuse or treat specially, before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import perturb, save, tiny_model


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "bmm_cli.cli", "plan", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "BMM_NO_PROGRESS": "1"})


def test_plan_names_experts_stored_in_another_dtype(family, tmp_path):
    base, ex = family("llama")
    e = save(perturb(tiny_model("llama", 0), 5).to(torch.bfloat16), tmp_path / "bf16-expert")
    p = _plan("--base", base, "--experts", ex[0], e)
    assert p.returncode == 0, p.stderr
    assert "DTYPE        expert 2:" in p.stdout and "BF16 where the base has F32" in p.stdout
    assert "--allow-dtype-mismatch" in p.stdout
    r = json.loads(_plan("--base", base, "--experts", ex[0], e, "--json").stdout)
    assert list(r["dtype_mismatches"]) == ["2"] and r["dtype_mismatches"]["2"]["expert_dtype"] == "BF16"
    assert json.loads(_plan("--base", base, "--experts", *ex, "--json").stdout)["dtype_mismatches"] == {}
