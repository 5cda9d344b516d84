"""bmm_cli.budget: the per-stage disk estimate against what the real stages write, and the free-space refusal."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bmm_cli import budget
from bmm_cli.errors import InputError


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def test_estimate_within_10_percent_of_the_real_stages(family, tmp_path):
    from bmm_cli.anchor import anchor
    from bmm_cli.factor_cache import prepare_trials
    from bmm_cli.gram import gram
    from bmm_cli.solve import solve
    from bmm_cli.taskvec import taskvec
    from bmm_cli.workdir import Sources, load_project

    base, experts = family("llama")
    work = tmp_path / "work"
    taskvec(str(base), [str(e) for e in experts], work)
    for a in ("tsv", "ta"):
        anchor(work, a, device="cpu")
    gram(work, "free", device="cpu")
    solve(work, "tsv", "free", out=tmp_path / "out", device="cpu")  # default λ: writes the evidence JSON
    prepare_trials(Sources(work, "tsv", "free"), device=torch.device("cpu"))
    proj = load_project(work)
    mods, others, total = budget.plan_modules(proj.plan, proj.base.meta)
    est = budget.estimate(mods, len(experts), others=others, anchors=("tsv", "ta"), search=True,
                          out_numel_bytes=total * 4, free_gram_stage=True)
    assert set(est.stages) == {p.name for p in work.iterdir() if not p.name.startswith(".")}
    for name, b in est.stages.items():
        assert b == pytest.approx(_dir_bytes(work / name), rel=0.10), name
    assert est.out == pytest.approx((tmp_path / "out" / "model.safetensors").stat().st_size, rel=0.10)
    assert est.work == sum(est.stages.values())
    assert budget.missing(est, work) <= 0.1 * est.work  # all written: (almost) nothing left
    assert budget.missing(est, tmp_path / "empty") == est.work


def test_estimate_at_8b_shapes_is_the_arithmetic():
    """Llama-3.1-8B blocks, T = 5: the float32 task vectors are 5 × 218,103,808 × 4 bytes per layer."""
    shapes = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
    mods = [budget.Module(f"model.layers.{i}.m{j}.weight", o, n, i) for i in range(32)
            for j, (o, n) in enumerate(shapes)]
    per_layer = sum(o * n for o, n in shapes)
    assert per_layer == 218_103_808
    g = sum(n * n for _, n in shapes)
    est = budget.estimate(mods, 5, anchors=("tsv",), search=True, factor_dtype="bfloat16", taskvec_dtype="float32",
                          free_gram_stage=True)
    assert est.stages["taskvec"] == pytest.approx(32 * 5 * per_layer * 4, rel=1e-4)
    assert est.stages["anchor-tsv"] == pytest.approx(32 * per_layer * 4, rel=1e-4)
    assert est.stages["gram-free"] == pytest.approx(32 * (g + per_layer) * 4, rel=1e-4)
    evals = 32 * sum(n for _, n in shapes) * 8  # Λ stays float64
    assert est.stages["factors-tsv-free"] == pytest.approx(32 * (g + 2 * per_layer) * 2 + evals, rel=1e-4)
    bf16 = budget.estimate(mods, 5, taskvec_dtype="bf16", evidence=False)
    assert bf16.stages["taskvec"] == pytest.approx(est.stages["taskvec"] / 2, rel=1e-4)
    data = budget.estimate(mods, 5, gram="hybrid")
    assert data.stages["gram-data"] == pytest.approx(est.stages["gram-free"] + 5 * 32 * g * 4, rel=1e-4)
    # the default: no copy of the task vectors (a marker per block and the plan) and no gram-free stage
    free = budget.estimate(mods, 5, anchors=("tsv",))
    assert set(free.stages) == {"taskvec", "anchor-tsv", "evidence-tsv-free.json"} and "gram-free" not in data.stages
    assert free.stages["taskvec"] < 1e6 and free.work < 1.01 * est.stages["anchor-tsv"]
    assert "factors-tsv-hybrid" not in budget.estimate(mods, 5, gram="hybrid", search=True).stages


def test_estimate_refuses_bad_options():
    with pytest.raises(InputError, match="dtype 'int3'"):
        budget.estimate([budget.Module("a", 2, 2)], 2, taskvec_dtype="int3")
    with pytest.raises(InputError, match="gram 'both'"):
        budget.estimate([budget.Module("a", 2, 2)], 2, gram="both")
    with pytest.raises(InputError, match="0 experts"):
        budget.estimate([budget.Module("a", 2, 2)], 0)


def _fake_statvfs(monkeypatch, free_blocks: int, frsize: int = 4096):
    seen = []

    def fake(path):
        seen.append(Path(path))
        return SimpleNamespace(f_bavail=free_blocks, f_frsize=frsize, f_bsize=frsize)

    monkeypatch.setattr(budget.os, "statvfs", fake)
    return seen


def test_check_free_refuses_in_one_line(monkeypatch, tmp_path):
    seen = _fake_statvfs(monkeypatch, free_blocks=1000)  # 4,096,000 bytes free
    work = tmp_path / "not" / "yet"
    with pytest.raises(InputError) as exc:
        budget.check_free(work, 5_000_000)
    msg = str(exc.value)
    assert "\n" not in msg and exc.value.exit_code == 2
    assert str(work) in msg and "5000000 bytes" in msg and "4096000 bytes" in msg and "--work" in msg
    assert seen[-1] == tmp_path  # the nearest existing parent is measured
    assert budget.check_free(work, 4_096_000) == 4_096_000


def test_check_free_on_a_real_small_tmpfs(tmpfs):
    mnt = tmpfs("1m")
    if mnt is None:
        pytest.skip("mounting a tmpfs needs root")
    where, free = budget.free_bytes(mnt / "work")
    assert where == mnt and 0 < free <= 1 << 20
    with pytest.raises(InputError, match="use --work on a disk with more space"):
        budget.check_free(mnt / "work", 2 << 20)
    assert budget.check_free(mnt / "work", 1000) == free


def test_lines_and_json():
    est = budget.Estimate({"taskvec": 3_000_000_000, "gram-free": 1_500_000}, out=2_000_000_000)
    lines = est.lines()
    assert lines[0].split() == ["taskvec", "3.0", "GB"] and lines[-2].split()[-2:] == ["3.0", "GB"]
    assert lines[-1].split() == ["output", "2.0", "GB"]
    assert est.to_json() == {"stages": {"taskvec": 3_000_000_000, "gram-free": 1_500_000}, "work": 3_001_500_000,
                             "out": 2_000_000_000}
    assert budget.fmt_bytes(999) == "999 B" and budget.fmt_bytes(1.5e12) == "1.5 TB"


# ---------------------------------------------------------------------------------------------------------------
# the estimate in `bmm plan`, and the refusal of merge / search / anchor before any work
# ---------------------------------------------------------------------------------------------------------------


def _cli(argv, capsys) -> tuple[int, str, str]:
    """One in-process ``bmm`` run: (exit code, stdout, stderr)."""
    from bmm_cli.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_plan_prints_the_disk_per_stage(family, capsys):
    import json

    base, experts = family("llama")
    rc, out, _ = _cli(["plan", "-b", base, "-e", *experts, "--json"], capsys)
    assert rc == 0
    disk = json.loads(out)["disk"]
    assert set(disk["stages"]) == {"taskvec", "anchor-tsv", "evidence-tsv-free.json"}
    assert disk["work"] == sum(disk["stages"].values()) and disk["out"] > 0
    assert list(disk["search_cache"]) == ["factors-tsv-free"]
    rc, out, _ = _cli(["plan", "-b", base, "-e", *experts, "--anchor", "ta", "--gram", "free"], capsys)
    lines = out.splitlines()
    i = next(j for j, x in enumerate(lines) if x.startswith("disk of `bmm merge --anchor ta --gram free`"))
    assert [x.split()[0] for x in lines[i + 1:i + 7]] == ["taskvec", "anchor-ta", "evidence-ta-free.json", "work",
                                                         "output", "factors-ta-free"]
    assert "--work" in lines[i]


def test_merge_on_a_full_disk_is_refused_before_any_work(family, tmp_path, capsys, monkeypatch, tmpfs):
    """A real small tmpfs where the machine allows one, else the work directory's statvfs faked: one line, exit 2,
    nothing created (neither the work directory nor the output)."""
    base, experts = family("llama")
    mnt = tmpfs("64k")
    if mnt is None:
        _fake_statvfs(monkeypatch, free_blocks=16)  # 64 kB
        mnt = tmp_path / "small"
        mnt.mkdir()
    work, out = mnt / "work", tmp_path / "out"
    rc, _, err = _cli(["merge", "-b", base, "-e", *experts, "-o", out, "--work", work, "--lam", "0.1",
                       "--device", "cpu"], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"bmm: error: {work}: the work directory") and "use --work on a disk" in err
    assert not work.exists() and not out.exists() and list(mnt.iterdir()) == []


def test_plan_refuses_a_small_work_disk_and_passes_a_large_one(family, tmp_path, capsys, monkeypatch):
    base, experts = family("llama")
    seen = _fake_statvfs(monkeypatch, free_blocks=10)
    rc, _, err = _cli(["plan", "-b", base, "-e", *experts, "--work", tmp_path / "w"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "40960 bytes) free" in err and seen
    _fake_statvfs(monkeypatch, free_blocks=1 << 30)
    rc, out, _ = _cli(["plan", "-b", base, "-e", *experts, "--work", tmp_path / "w"], capsys)
    assert rc == 0 and f"{tmp_path / 'w'}: 4.4 TB free" in out
    assert not (tmp_path / "w").exists()


def test_search_and_anchor_check_what_they_still_write(family, tmp_path, capsys, monkeypatch):
    """In a work dir with every stage but the search's: the factor cache is what is missing; a finished anchor stage
    needs nothing, a new one its own bytes."""
    from conftest import ready_work

    from bmm_cli.workdir import load_project

    work = ready_work(family, "llama", tmp_path / "w", method="ta")
    def files():  # the work dir's lock file is every command's, refused or not
        return sorted(str(p) for p in work.rglob("*") if p.name != ".bmm.lock")

    before = files()
    proj = load_project(work)
    est = budget.for_merge(proj.plan, proj.base.meta, proj.num_tasks, anchor="ta", gram="free", search=True)
    assert budget.missing(budget.only(est, ("taskvec", "anchor-", "gram-")), work) == 0  # complete stages
    assert budget.missing(est, work) == est.stages["factors-ta-free"] + est.stages["evidence-ta-free.json"]
    _fake_statvfs(monkeypatch, free_blocks=1)
    rc, _, err = _cli(["search", "-w", work, "-a", "ta", "--gram", "free", "--eval", "echo 1", "--trials", "1",
                       "-o", tmp_path / "best", "--device", "cpu"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "use --work on a disk" in err, err
    rc, _, err = _cli(["anchor", "-w", work, "-m", "tsv", "--device", "cpu"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "use --work on a disk" in err, err
    assert files() == before and not (tmp_path / "best").exists()
    rc, _, err = _cli(["anchor", "-w", work, "-m", "ta", "--device", "cpu"], capsys)  # finished: nothing to write
    assert rc == 0, err


def test_solve_checks_the_output_disk_before_writing(family, tmp_path, capsys, monkeypatch, tmpfs):
    """``bmm solve`` (every model writer) refuses an output file system too small for the model in one line, before
    creating anything there; the work directory is left as it was."""
    from conftest import ready_work

    work = ready_work(family, "llama", tmp_path / "w", method="ta")
    mnt = tmpfs("64k")
    if mnt is None:
        _fake_statvfs(monkeypatch, free_blocks=16)  # 64 kB
        mnt = tmp_path / "small"
        mnt.mkdir()
    def files():  # the work dir's lock file is every command's, refused or not
        return sorted(str(p) for p in work.rglob("*") if p.name != ".bmm.lock")

    before = files()
    rc, _, err = _cli(["solve", "-w", work, "-a", "ta", "--lam", "0.1", "-o", mnt / "out", "--device", "cpu"], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"bmm: error: {mnt / 'out'}: the merged model needs") and "use --out on a disk" in err
    assert list(mnt.iterdir()) == [] and files() == before


def test_a_resumed_output_needs_only_its_unfinished_shards(tmp_path, monkeypatch):
    """A writer killed after its first shard: the rerun asks for the two shards left (1 KiB each and a header
    entry of name + 64 bytes and 64 bytes more per file), not for all three."""
    from bmm_cli.writer import SMALL_FILES, ModelWriter

    tensors = {f"t{i}": torch.full((16, 16), float(i)) for i in range(3)}
    entries = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    out = tmp_path / "out"
    w = ModelWriter(out, entries, max_shard_size=16 * 16 * 4, copy_from=None, plan_id="p")
    w.add("t0", tensors["t0"])
    w.abort()  # as if killed: shard 1 is finished and kept for a resume
    need = 2 * (16 * 16 * 4 + len("t1") + 64 + 64) + SMALL_FILES
    _fake_statvfs(monkeypatch, free_blocks=need - 1, frsize=1)
    with pytest.raises(InputError, match=f"the merged model needs .*\\({need} bytes\\)"):
        ModelWriter(out, entries, max_shard_size=16 * 16 * 4, copy_from=None, plan_id="p")
    _fake_statvfs(monkeypatch, free_blocks=need, frsize=1)
    w = ModelWriter(out, entries, max_shard_size=16 * 16 * 4, copy_from=None, plan_id="p")
    assert w.done == {w.shard_of["t0"].name}
    for k in ("t1", "t2"):
        w.add(k, tensors[k])
    w.close(recipe={}, card="")
    assert (out / "model.safetensors.index.json").exists()
