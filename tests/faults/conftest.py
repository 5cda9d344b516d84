"""Fixtures of the fault-injection suite: one uninterrupted reference pipeline (built in-process, once) that every
kill/resume test compares its bytes with, and runners for ``bmm`` in a subprocess or in this process."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from ._util import SOLVE_ARGS, write_calib_files


@pytest.fixture(autouse=True)
def _one_thread():
    """Reference runs here and the subprocesses (OMP_NUM_THREADS=1, see _util.ENV) use one intra-op thread, so
    bytes can be compared whatever the machine's core count; it also avoids OpenMP spin-waits on a busy CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def ref(family, tmp_path_factory):
    """An uninterrupted run of every stage on the tiny Llama family: taskvec, anchor ties (global pass), gram free,
    gram data, solve (several output shards). Tests copy the stages they need from ``ref.work``."""
    from bmm_cli.anchor import anchor
    from bmm_cli.gram import gram
    from bmm_cli.solve import solve
    from bmm_cli.taskvec import taskvec

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base, experts = family("llama")
        root = tmp_path_factory.mktemp("faults-ref")
        calib = write_calib_files(root, len(experts), 8)
        work = root / "work"
        taskvec(str(base), [str(e) for e in experts], work)
        anchor(work, "ties")
        gram(work, "free")
        gram(work, "data", calib=calib, samples=8, max_len=32, device="cpu")
        out = root / "out"
        solve(work, "ties", "free", out=out, lam=0.05, max_shard_size="30KB", device="cpu")
        out2 = root / "out-lam007"
        solve(work, "ties", "free", out=out2, lam=0.07, max_shard_size="30KB", device="cpu")
    finally:
        torch.set_num_threads(old)
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    return SimpleNamespace(base=base, experts=experts, root=root, calib=calib, work=work, out=out, out2=out2,
                           solve_args=SOLVE_ARGS)


@pytest.fixture
def work_from(ref, tmp_path):
    """work_from(*stages) -> a fresh work dir holding copies of the reference's finished ``stages``."""

    def make(*stages, name="w"):
        w = tmp_path / name
        w.mkdir()
        for s in stages:
            shutil.copytree(ref.work / s, w / s)
        return w

    return make
