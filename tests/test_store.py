import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from bmm_cli import store
from bmm_cli.errors import InputError, NumericError
from bmm_cli.store import Checkpoint
from bmm_cli.writer import ModelWriter, parse_size, plan_shards


def test_open_single_and_sharded_agree(family):
    b1, _ = family("llama")
    b2, _ = family("llama", sharded=True)
    c1, c2 = Checkpoint.open(b1), Checkpoint.open(b2)
    assert len(c2.files) > 1 and len(c1.files) == 1
    assert set(c1.keys()) == set(c2.keys())
    for k in c1.keys():
        assert torch.equal(c1.get(k), c2.get(k))
        assert c1.meta[k].shape == c2.meta[k].shape


def test_residency_counts_live_tensors(family):
    b, _ = family("bert")
    c = Checkpoint.open(b)
    store.residency.reset_peak()
    start = store.residency.live
    for k in c.keys():
        t = c.get(k)
        del t
    assert store.residency.peak <= start + 1
    kept = [c.get(k) for k in c.keys()[:5]]
    assert store.residency.live >= start + 5
    del kept


def test_refuses_pickle(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(InputError, match="pickle"):
        Checkpoint.open(tmp_path)
    with pytest.raises(InputError, match="pickle"):
        Checkpoint.open(tmp_path / "pytorch_model.bin")


def test_missing_path_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="no such file"):
        Checkpoint.open(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(InputError, match="HF_HUB_OFFLINE"):
        Checkpoint.open("someorg/not-a-cached-model")


def test_truncated_and_corrupt_files(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"a": torch.ones(4, 4)}, str(d / "model.safetensors"))
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:-10])
    with pytest.raises(InputError, match="truncated"):
        Checkpoint.open(d)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 10) + b"{not json!" + raw[18:])
    with pytest.raises(InputError, match="corrupt safetensors header"):
        Checkpoint.open(d)
    (d / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(InputError, match="not a safetensors file"):
        Checkpoint.open(d)


def test_index_pointing_at_missing_shard(family, tmp_path):
    import shutil

    b, _ = family("llama", sharded=True)
    d = tmp_path / "copy"
    shutil.copytree(b, d)
    victim = sorted(d.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(InputError, match="missing"):
        Checkpoint.open(d)


def test_nan_is_reported_with_file_and_tensor(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    t = torch.ones(3, 3)
    t[1, 1] = float("nan")
    save_file({"w": t}, str(d / "model.safetensors"))
    c = Checkpoint.open(d)
    with pytest.raises(NumericError, match=r"model.safetensors: tensor 'w' has 1 NaN"):
        c.get("w")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("1000") == 1000
    with pytest.raises(InputError):
        parse_size("lots")


def test_plan_shards_limits():
    sh = plan_shards([("a", 40), ("b", 40), ("c", 100), ("d", 10)], 90)
    assert [s.keys for s in sh] == [["a", "b"], ["c"], ["d"]]
    assert sh[0].name == "model-00001-of-00003.safetensors"
    assert plan_shards([("a", 1)], 90)[0].name == "model.safetensors"


def _entries(tensors):
    return [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]


def test_model_writer_sharded_roundtrip(tmp_path, family):
    b, _ = family("bert")
    tensors = {f"t{i}": torch.randn(16, 16) for i in range(6)}
    out = tmp_path / "out"
    w = ModelWriter(out, _entries(tensors), max_shard_size=16 * 16 * 4 * 2, copy_from=b)
    for k in reversed(list(tensors)):  # any order
        w.add(k, tensors[k])
    w.close(recipe={"base": "x"}, card="# card")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert (out / "config.json").exists() and (out / "bmm_merge.json").exists() and (out / "README.md").exists()
    c = Checkpoint.open(out)
    for k, v in tensors.items():
        assert torch.equal(c.get(k), v)
    assert not (tmp_path / ".out.bmm-partial").exists()


def test_model_writer_refuses_foreign_dir_and_keeps_old_output_on_failure(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a bmm output"):
        ModelWriter(foreign, [("a", (2,), torch.float32)], max_shard_size=100, copy_from=None)
    out = tmp_path / "out"
    w = ModelWriter(out, [("a", (2,), torch.float32)], max_shard_size=100, copy_from=None)
    w.add("a", torch.ones(2))
    w.close(recipe={}, card="")
    w2 = ModelWriter(out, [("a", (2,), torch.float32)], max_shard_size=100, copy_from=None)
    with pytest.raises(NumericError):
        w2.add("a", torch.tensor([1.0, float("inf")]))
    assert torch.equal(Checkpoint.open(out).get("a"), torch.ones(2))


def test_atomic_write_leaves_old_file_on_error(tmp_path):
    from bmm_cli import atomic

    p = tmp_path / "f.json"
    atomic.write_json(p, {"v": 1})

    def boom(tmp):
        tmp.write_text("partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic.write_with(p, boom)
    assert json.loads(p.read_text()) == {"v": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]


def test_read_jsonl_skips_torn_line(tmp_path):
    from bmm_cli import atomic

    p = tmp_path / "t.jsonl"
    atomic.append_line(p, json.dumps({"a": 1}))
    with open(p, "a") as fh:
        fh.write('{"a": 2, "tor')
    atomic.append_line(p, json.dumps({"a": 3}))
    assert [r["a"] for r in atomic.read_jsonl(p)] == [1, 3]


@pytest.fixture
def umask():
    """umask(mask): set the process umask for the test; the old one is restored afterwards."""
    import os

    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_honour_the_umask(family, tmp_path, umask, mask):
    """Every file bmm writes (model shards, index, config, tokenizer, card, marker, work shards, manifests, search
    records) is created 0666 & ~umask and every directory 0777 & ~umask, like a plain open()/mkdir
    (0600 files cannot be read by a serving container running as another uid)."""
    import os
    import stat

    from bmm_cli import atomic
    from bmm_cli.merge import merge

    base, experts = family("llama")
    umask(mask)
    out, work = tmp_path / "out", tmp_path / "w"
    merge(str(base), [str(e) for e in experts], out, work=work, max_shard_size="30KB", device="cpu")
    atomic.append_line(work / "records.jsonl", "{}")
    files = [p for root in (out, work) for p in root.rglob("*")]
    assert len([p for p in files if p.suffix == ".safetensors"]) > 6 and (out / "tokenizer.json").is_file()
    for p in [out, work, *files]:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(os.stat(p).st_mode) == want, f"{p}: {oct(stat.S_IMODE(os.stat(p).st_mode))}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_output_config_names_the_written_dtype(family, tmp_path, dtype):
    """--dtype bfloat16: config.json says so (both ``dtype``, read by transformers 5, and ``torch_dtype``, read by
    older versions), so from_pretrained(dtype="auto") loads the model in the dtype of its tensors."""
    from transformers import AutoModelForCausalLM

    from bmm_cli.merge import merge

    base, experts = family("llama")
    assert json.loads((base / "config.json").read_text())["dtype"] == "float32"
    out = tmp_path / "out"
    merge(str(base), [str(e) for e in experts], out, work=tmp_path / "w", dtype=dtype, device="cpu")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == dtype and cfg["torch_dtype"] == dtype
    assert {str(Checkpoint.open(out).meta[k].dtype) for k in Checkpoint.open(out).meta} == {
        {"bfloat16": "BF16", "float16": "F16"}[dtype]}
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert model.dtype == getattr(torch, dtype)
    # without --dtype the config is copied as it was (the base's dtype is the written one)
    merge(str(base), [str(e) for e in experts], tmp_path / "same", work=tmp_path / "w", device="cpu")
    assert (tmp_path / "same" / "config.json").read_bytes() == (base / "config.json").read_bytes()


def _save_file_order(tensors):
    """The order safetensors.torch.save_file lays tensors out: by dtype (its enum, descending), then by name."""
    rank = {torch.int64: 0, torch.float64: 1, torch.float32: 2, torch.bfloat16: 3, torch.float16: 4}
    return sorted(tensors, key=lambda k: (rank[tensors[k].dtype], k))


def test_streamed_shard_is_byte_identical_to_save_file(tmp_path, family):
    """A streamed output shard (header first from the planned shapes, data appended as tensors arrive, in any
    order) has save_file's bytes when the entries come in save_file's order; it loads with safetensors."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.0.w": torch.randn(5, 3, generator=g),
        "model.layers.10.w": torch.randn(7, generator=g).to(torch.bfloat16),  # odd byte count before F16
        "model.layers.2.w": torch.randn(3, 3, generator=g).to(torch.float16),
        "embed.position_ids": torch.arange(6).reshape(1, 6),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "norm.weight": torch.randn(4, generator=g),
    }
    b, _ = family("bert")
    order = _save_file_order(tensors)
    out = tmp_path / "out"
    w = ModelWriter(out, [(k, tuple(tensors[k].shape), tensors[k].dtype) for k in order], max_shard_size=1 << 20,
                    copy_from=b)
    for k in reversed(order):  # every tensor but the last waits for its turn
        w.add(k, tensors[k])
    w.close(recipe={"base": "x"}, card="# card")
    save_file({k: tensors[k] for k in order}, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        for k, v in tensors.items():
            assert torch.equal(fh.get_tensor(k), v), k


def test_model_writer_streams_each_tensor_to_its_shard(tmp_path, family):
    """Tensors produced in the entries' order go to disk as they arrive (nothing held back); one that comes
    early waits only until the tensors before it are in; a shard appears under its name only when complete."""
    b, _ = family("bert")
    tensors = {f"t{i}": torch.full((8, 8), float(i)) for i in range(4)}
    out = tmp_path / "out"
    w = ModelWriter(out, _entries(tensors), max_shard_size=1 << 20, copy_from=b)
    staging = tmp_path / ".out.bmm-partial"
    st = w.streams["model.safetensors"]
    w.add("t0", tensors["t0"])
    w.add("t1", tensors["t1"])
    temp = [p for p in staging.iterdir() if p.name.endswith(".tmp")]
    assert len(temp) == 1 and temp[0].stat().st_size == len(st.header) + 2 * 256
    assert not st._waiting and not (staging / "model.safetensors").exists()
    w.add("t3", tensors["t3"])  # before its turn: held
    assert list(st._waiting) == ["t3"] and temp[0].stat().st_size == len(st.header) + 2 * 256
    w.add("t2", tensors["t2"])
    assert not st._waiting and (staging / "model.safetensors").exists() and not temp[0].exists()
    w.close(recipe={"base": "x"}, card="# card")
    c = Checkpoint.open(out)
    assert all(torch.equal(c.get(k), v) for k, v in tensors.items())


def test_model_writer_error_leaves_no_temp_file(tmp_path, family):
    b, _ = family("bert")
    tensors = {"a": torch.ones(4, 4), "b": torch.ones(4, 4)}
    out = tmp_path / "out"
    w = ModelWriter(out, _entries(tensors), max_shard_size=1 << 20, copy_from=b)
    w.add("a", tensors["a"])
    with pytest.raises(NumericError, match="'b' has NaN"):
        w.add("b", torch.full((4, 4), float("nan")))
    assert not [p for p in (tmp_path / ".out.bmm-partial").iterdir() if p.name.endswith(".tmp")]
    assert not out.exists()
