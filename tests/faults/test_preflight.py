"""Bad input is refused before any heavy work: `bmm merge` exits 2 with ONE line on stderr that names the file (and
the tensor) and says how to fix it, and the work directory holds no stage shard, --out does not exist."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from ._util import ENV, argv, bmm_inproc, perturb, save, tiny_model, write_calib_files


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit(path, fn):
    """Rewrite one safetensors file with fn(state_dict) -> state_dict."""
    sd = load_file(str(path))
    save_file(fn(sd), str(path), metadata={"format": "pt"})


def _llama_variant(tmp_path, name, seed=7, **cfg):
    """A Llama expert of the tiny family with config overrides (same init as the family's base)."""
    import transformers as tf

    torch.manual_seed(0)
    kw = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    kw.update(cfg)
    return save(perturb(tf.LlamaForCausalLM(tf.LlamaConfig(**kw)), seed), tmp_path / name)


class Evil:
    """Unpickling this creates a directory: proof that a pickle was (or was not) loaded."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.mkdir, (self.sentinel,))


# each builder: (family, tmp_path) -> (base, experts, [what the message must contain: str or regex])


def missing_expert(family, tmp_path):
    base, ex = family("llama")
    return base, [ex[0], tmp_path / "nope"], [str(tmp_path / "nope"), "no such file or directory"]


def missing_shard(family, tmp_path):
    base, ex = family("llama", sharded=True)
    e = _copy(ex[1], tmp_path / "e")
    victim = sorted(e.glob("model-*.safetensors"))[1]
    victim.unlink()
    return base, [ex[0], e], [victim.name, str(e), "missing", "fetch the missing shard"]


def truncated_shard(family, tmp_path):
    base, ex = family("llama", sharded=True)
    e = _copy(ex[1], tmp_path / "e")
    victim = sorted(e.glob("model-*.safetensors"))[2]
    victim.write_bytes(victim.read_bytes()[:-100])
    return base, [ex[0], e], [str(victim), "truncated", "fetch it again"]


def corrupt_header(family, tmp_path):
    base, ex = family("llama")
    e = _copy(ex[1], tmp_path / "e")
    f = e / "model.safetensors"
    raw = bytearray(f.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    raw[8 + n // 2: 8 + n // 2 + 4] = b"\xff\xfe{["
    f.write_bytes(bytes(raw))
    return base, [ex[0], e], [str(f), "corrupt safetensors header", "re-download"]


def index_points_at_missing_file(family, tmp_path):
    base, ex = family("llama", sharded=True)
    e = _copy(ex[1], tmp_path / "e")
    idx = e / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    key = next(iter(d["weight_map"]))
    d["weight_map"][key] = "model-00009-of-00009.safetensors"
    idx.write_text(json.dumps(d))
    return base, [ex[0], e], [str(idx), "model-00009-of-00009.safetensors", "missing"]


def single_file_and_index(family, tmp_path):
    """A stale model.safetensors next to a sharded save: transformers would load one, bmm the other."""
    base, ex = family("llama", sharded=True)
    e = _copy(ex[1], tmp_path / "e")
    shutil.copy(family("llama")[1][0] / "model.safetensors", e / "model.safetensors")
    return base, [ex[0], e], [str(e), "model.safetensors.index.json", "stale", "delete it"]


def key_set_mismatch(family, tmp_path):
    base, ex = family("llama")
    e = _copy(ex[1], tmp_path / "e")
    norm = "model.layers.2.input_layernorm.weight"
    _edit(e / "model.safetensors", lambda sd: {k: v for k, v in sd.items() if k != norm})
    return base, [ex[0], e], [str(e), f"'{norm}'", "missing", "fine-tune of the same base"]


def shape_mismatch(family, tmp_path):
    base, ex = family("llama")
    e = _copy(ex[1], tmp_path / "e")
    key = "model.layers.1.self_attn.o_proj.weight"
    _edit(e / "model.safetensors", lambda sd: {**sd, key: sd[key][:, :-2].contiguous()})
    return base, [ex[0], e], [str(e / "model.safetensors"), repr(key), "[32, 30]", "not a fine-tune of this base"]


def vocab_resized(family, tmp_path):
    base, ex = family("llama")
    m = tiny_model("llama", 0)
    m.resize_token_embeddings(120)
    e = save(perturb(m, 5), tmp_path / "e")
    # appended rows are merged by the token plan, which needs the expert's tokenizer to match rows to tokens
    return base, [ex[0], e], [f"expert 2 ({e})", "no tokenizer.json", "120 rows", "base's 100"]


def tied_vs_untied_llama(family, tmp_path):
    base, ex = family("llama")  # tie_word_embeddings=False: has lm_head.weight
    e = _llama_variant(tmp_path, "tied", tie_word_embeddings=True)
    return base, [ex[0], e], [str(e), "'lm_head.weight'", "tie_word_embeddings"]


def untied_vs_tied_gpt2(family, tmp_path):
    import transformers as tf

    base, ex = family("gpt2")  # tied: no lm_head.weight in the file
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=4, n_positions=64, tie_word_embeddings=False)
    e = save(perturb(tf.GPT2LMHeadModel(cfg), 9), tmp_path / "untied")
    return base, [ex[0], e], [str(e), "'lm_head.weight'", "tie_word_embeddings"]


def nan_in_other_tensor(family, tmp_path):
    base, ex = family("llama")
    e = _copy(ex[1], tmp_path / "e")
    key = "model.layers.2.post_attention_layernorm.weight"  # not solved: read by the anchor stage
    _edit(e / "model.safetensors", lambda sd: {**sd, key: torch.where(torch.arange(32) == 3, float("nan"), sd[key])})
    return base, [ex[0], e], [str(e / "model.safetensors"), repr(key), "NaN"]


def mixed_dtypes(family, tmp_path):
    base, ex = family("llama")
    m = tiny_model("llama", 0)
    e = save(perturb(m, 5).to(torch.bfloat16), tmp_path / "e")
    return base, [ex[0], e], [str(e / "model.safetensors"), "BF16", "F32", "--allow-dtype-mismatch"]


def no_solvable_module(family, tmp_path):
    import transformers as tf

    cfg = tf.MambaConfig(vocab_size=100, hidden_size=32, state_size=4, num_hidden_layers=2)
    torch.manual_seed(0)
    b = save(tf.MambaForCausalLM(cfg), tmp_path / "mamba-base")
    es = []
    for t in range(2):
        torch.manual_seed(0)
        es.append(save(perturb(tf.MambaForCausalLM(cfg), t), tmp_path / f"mamba-e{t}"))
    return b, es, [str(b), "no solvable module", "cannot merge this architecture"]


def pickle_only_expert(family, tmp_path):
    base, ex = family("llama")
    e = tmp_path / "pickled"
    e.mkdir()
    shutil.copy(ex[1] / "config.json", e)
    with open(e / "pytorch_model.bin", "wb") as fh:
        pickle.dump(Evil(tmp_path / "PWNED"), fh)
    return base, [ex[0], e], [str(e), "pytorch_model.bin", "pickle", "safe_serialization=True"]


def pickle_file_expert(family, tmp_path):
    base, ex = family("llama")
    e = tmp_path / "pickled"
    e.mkdir()
    with open(e / "pytorch_model.bin", "wb") as fh:
        pickle.dump(Evil(tmp_path / "PWNED"), fh)
    return base, [ex[0], e / "pytorch_model.bin"], [str(e / "pytorch_model.bin"), "pickle", "safe_serialization=True"]


NO_VOCAB = re.compile(r"^(?!.*vocab)")  # the message must not blame the vocabulary
NO_TIES = re.compile(r"^(?!.*tie)")


def hidden_size_differs(family, tmp_path):
    """Another width: config.json says so first (not "the vocabulary was resized (vocab_size 100 vs 100)")."""
    base, ex = family("llama")
    e = _llama_variant(tmp_path, "wide", hidden_size=48, intermediate_size=64)
    return base, [ex[0], e], [str(e / "config.json"), "hidden_size 48 vs 32", "not a fine-tune of this base",
                              NO_VOCAB]


def layers_differ(family, tmp_path):
    base, ex = family("llama")
    e = _llama_variant(tmp_path, "deep", num_hidden_layers=4)
    return base, [ex[0], e], [str(e / "config.json"), "num_hidden_layers 4 vs 3", NO_VOCAB]


def gpt2_expert_llama_base(family, tmp_path):
    """Another architecture: model_type differs (not "one checkpoint ties lm_head")."""
    base, _ = family("llama")
    g = family("gpt2")[1][0]
    return base, [family("llama")[1][0], g], [str(g / "config.json"), "model_type gpt2 vs llama", NO_TIES]


def hidden_size_differs_without_config(family, tmp_path):
    """Bare safetensors files (no config.json): a width change is not called a vocabulary resize."""
    base, ex = family("llama")
    e = _llama_variant(tmp_path, "wide", hidden_size=48, intermediate_size=64)
    (e / "config.json").unlink()
    b = _copy(base, tmp_path / "b")
    (b / "config.json").unlink()
    return b, [ex[0], e], [str(e / "model.safetensors"), "[100, 48]", "not a fine-tune of this base", NO_VOCAB]


CASES = [hidden_size_differs, layers_differ, gpt2_expert_llama_base, hidden_size_differs_without_config,
         missing_expert, missing_shard, truncated_shard, corrupt_header, index_points_at_missing_file,
         single_file_and_index, key_set_mismatch, shape_mismatch, vocab_resized, tied_vs_untied_llama,
         untied_vs_tied_gpt2, nan_in_other_tensor, mixed_dtypes, no_solvable_module, pickle_only_expert,
         pickle_file_expert]


def _check_refused(code, err, want, work, out):
    assert code == 2, f"exit {code}: {err}"
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("bmm: error: "), err
    for w in want:
        assert (re.search(w.pattern, err) if isinstance(w, re.Pattern) else w in err), f"{w!r} not in: {err}"
    assert "Traceback" not in err
    assert not list(work.rglob("*.safetensors")), "stage shards were written before the input was refused"
    assert not out.exists()


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_refused_before_work(case, family, tmp_path, capsys):
    base, experts, want = case(family, tmp_path)
    work, out = tmp_path / "work", tmp_path / "out"
    code, _, err = bmm_inproc(["merge", "--base", base, "--experts", *experts, "--out", out, "--work", work,
                               "--anchor", "ties", "--device", "cpu"], capsys)
    _check_refused(code, err, want, work, out)
    assert not (tmp_path / "PWNED").exists(), "a pickle was unpickled"


def test_inf_in_a_solved_tensor_stops_before_anything_derived_from_it(family, tmp_path, capsys):
    """NaN/Inf in a solvable tensor is found when taskvec reads it (no extra pass over every expert): exit 2 naming
    file and tensor, nothing computed from that block is written, the stage does not count as finished and no later
    stage runs. (Blocks before it keep their valid shards; see docs/guarantees.md for why there is no full pre-scan.)"""
    base, ex = family("llama")
    e = _copy(ex[1], tmp_path / "e")
    key = "model.layers.1.mlp.down_proj.weight"
    _edit(e / "model.safetensors", lambda sd: {**sd, key: sd[key].index_fill(0, torch.tensor([5]), float("inf"))})
    work, out = tmp_path / "work", tmp_path / "out"
    code, _, err = bmm_inproc(["merge", "--base", base, "--experts", ex[0], e, "--out", out, "--work", work,
                               "--device", "cpu"], capsys)
    # (after merge's "bmm: work directory ..." status line) the error: one line, file, tensor, fix
    status, error = err.rstrip("\n").split("\n")
    assert code == 2 and status.startswith("bmm: work directory") and error.startswith("bmm: error: "), err
    assert str(e / "model.safetensors") in error and repr(key) in error and "NaN/Inf" in error
    assert "re-export" in error
    assert not (work / "taskvec" / "block-001.safetensors").exists()
    assert not json.loads((work / "taskvec" / "stage.json").read_text())["complete"]
    assert sorted(p.name for p in work.iterdir() if p.is_dir()) == ["taskvec"] and not out.exists()


def test_hub_id_offline_one_line(tmp_path, family):
    """A hub id that is not in the (empty) cache while HF_HUB_OFFLINE=1: exit 2, one line naming the id and the fix.
    In a subprocess: huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when it is imported."""
    base, ex = family("llama")
    env = dict(ENV, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    work = tmp_path / "work"
    p = subprocess.run(argv(["merge", "--base", base, "--experts", ex[0], "someorg/not-a-cached-model",
                             "--out", tmp_path / "out", "--work", work]),
                       env=env, capture_output=True, text=True, timeout=120)
    _check_refused(p.returncode, p.stderr, ["someorg/not-a-cached-model", "HF_HUB_OFFLINE",
                                            "download it first or pass a local path"], work, tmp_path / "out")


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _params_file(tmp_path, **extra):
    d = {"s_0": 1.0, **{f"lam_0_{g}": 0.1 for g in ("attn_in", "attn_out", "mlp_in", "mlp_out")}, **extra}
    p = tmp_path / "inputs" / "params.json"
    p.write_text(json.dumps(d))
    return p


# each: tmp_path -> (extra merge options, [what the message must contain]); every one is refused in preflight
OPTION_CASES = {
    "dtype_int8": lambda t: (["--dtype", "int8"], ["--dtype", "'int8'", "bfloat16"]),
    "scale_zero": lambda t: (["--scale", "0"], ["--scale 0", "positive"]),
    "scale_negative": lambda t: (["--scale", "-0.5"], ["--scale -0.5", "positive"]),
    "blocks_more_than_layers": lambda t: (["--blocks", "4"], ["--blocks 4", "3 layers", "at most 3"]),
    "epsilon_with_gram_free": lambda t: (["--epsilon", "0.3"], ["--epsilon", "--gram hybrid", "free"]),
    "shard_size": lambda t: (["--max-shard-size", "lots"], ["--max-shard-size", "'lots'"]),
    "device": lambda t: (["--device", "tpu9"], ["--device", "tpu9"]),
    "params_unknown_block_group": lambda t: (["--params", _params_file(t, lam_1_attn_in=0.2)],
                                             [str(t / "inputs" / "params.json"), "lam_1_attn_in", "s_1"]),
    "params_unknown_key": lambda t: (["--params", _params_file(t, lamda=0.2)],
                                     [str(t / "inputs" / "params.json"), "'lamda'"]),
    "params_scale_zero": lambda t: (["--params", _params_file(t, s_0=0.0)], ["s_0 = 0.0", "positive"]),
    "params_more_groups_than_layers": lambda t: (
        ["--params", _params_file(t, **{f"{k}_{b}{g}": 1.0 for b in (1, 2, 3) for k, g in
                                        [("s", "")] + [("lam", f"_{x}") for x in ("attn_in", "attn_out", "mlp_in",
                                                                                   "mlp_out")]})],
        ["4 block-groups", "3 layers"]),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_bad_option_refused_before_any_stage(case, family, tmp_path, capsys):
    """Every option is checked before taskvec runs, and a refused run creates nothing: no work
    directory, no lock file, no output (item 9)."""
    base, ex = family("llama")
    (tmp_path / "inputs").mkdir()
    extra, want = OPTION_CASES[case](tmp_path)
    before = _listing(tmp_path)
    code, _, err = bmm_inproc(["merge", "--base", base, "--experts", *ex, "--out", tmp_path / "out", *extra], capsys)
    _check_refused(code, err, want, tmp_path, tmp_path / "out")
    assert _listing(tmp_path) == before


def test_out_at_the_base_creates_no_work_dir_next_to_it(family, tmp_path, capsys):
    base, ex = family("llama")
    b = _copy(base, tmp_path / "models" / "llama-base")
    before = _listing(tmp_path)
    code, _, err = bmm_inproc(["merge", "--base", b, "--experts", *ex, "--out", b], capsys)
    assert code == 2 and "base model" in err, err
    assert _listing(tmp_path) == before  # no models/llama-base.bmm-work/.bmm.lock


@pytest.mark.parametrize("cmd", [["solve", "--out", "o"], ["anchor", "--method", "ta"], ["gram", "--kind", "free"],
                                 ["search", "--eval", "echo 1", "--out", "o"]])
def test_stage_with_a_missing_work_dir_is_an_error(cmd, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = bmm_inproc([cmd[0], "-w", "typo_dir", *cmd[1:]], capsys)
    assert code == 2 and "typo_dir" in err and "bmm taskvec" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_taskvec_refused_creates_no_work_dir(family, tmp_path, capsys):
    base, ex = family("llama")
    code, _, err = bmm_inproc(["taskvec", "--base", base, "--experts", ex[0], tmp_path / "nope", "--work",
                               tmp_path / "a" / "w"], capsys)
    assert code == 2 and "nope" in err
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_failure_names_the_expert_and_calibration_file(family, tmp_path, capsys):
    """A base whose tokenizer cannot be loaded: bad input (exit 2) naming the expert and its calibration file,
    found in preflight (not "internal error: KeyError" after taskvec)."""
    base, ex = family("llama")
    b = _copy(base, tmp_path / "b")
    (b / "tokenizer.json").write_text('{"version": "1.0"}')  # parses, but no "added_tokens" / "model"
    calib = write_calib_files(tmp_path, 2, 4)
    work, out = tmp_path / "w", tmp_path / "out"
    code, _, err = bmm_inproc(["merge", "--base", b, "--experts", *ex[:2], "--calib", *calib, "--out", out,
                               "--samples", "4", "--device", "cpu"], capsys)
    _check_refused(code, err, ["expert 1", str(ex[0]), str(tmp_path / "calib0.jsonl"), "tokenizer", str(b)],
                   work, out)
    assert "internal error" not in err and not (tmp_path / "out.bmm-work").exists()


def test_gram_data_tokenizer_failure_names_the_expert_and_calibration_file(family, tmp_path, capsys):
    """The same failure in `bmm gram --kind data` (no merge preflight before it): exit 2 with expert and file."""
    base, ex = family("llama")
    b = _copy(base, tmp_path / "b")
    (b / "tokenizer.json").write_text('{"version": "1.0"}')
    calib = write_calib_files(tmp_path, 2, 4)
    w = tmp_path / "w"
    assert bmm_inproc(["taskvec", "--base", b, "--experts", *ex[:2], "--work", w], capsys)[0] == 0
    code, _, err = bmm_inproc(["gram", "-w", w, "--kind", "data", "--calib", *calib, "--samples", "4",
                               "--device", "cpu"], capsys)
    assert code == 2 and "internal error" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("bmm: error: ") and "expert 1" in line and str(tmp_path / "calib0.jsonl") in line, err
    assert "tokenizer" in line and "KeyError" in line
    assert not list((w / "gram-data").glob("*.safetensors"))


def test_calib_names_match_the_experts_however_they_are_spelled(family, tmp_path, capsys, monkeypatch):
    """`--calib` names an expert by the path as given (relative, through `..`), its directory name or a symlink's
    name: the preflight and the gram stage agree, so the merge runs through (no exit 2 after taskvec)."""
    base, ex = family("llama")
    (tmp_path / "models").mkdir()
    link = tmp_path / "models" / "second"
    link.symlink_to(ex[1], target_is_directory=True)
    cwd = tmp_path / "run"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rel = os.path.relpath(ex[0], cwd)  # ../…/expert dir
    files = [spec.split("=", 1)[1] for spec in write_calib_files(tmp_path, 2, 4)]
    out = tmp_path / "out"
    code, _, err = bmm_inproc(["merge", "--base", base, "--experts", rel, "../models/second", "--gram", "data",
                               "--calib", f"{rel}={files[0]}", "--calib", f"second={files[1]}", "--samples", "4",
                               "--max-len", "16", "--lam", "0.1", "--device", "cpu", "--out", out], capsys)
    assert code == 0, err
    assert (out / "config.json").exists()


def test_calib_that_is_not_a_regular_file_says_so(family, tmp_path, capsys):
    base, ex = family("llama")
    code, _, err = bmm_inproc(["merge", "--base", base, "--experts", *ex[:2], "--gram", "data", "--calib",
                               "1=/dev/null", "--calib", f"2={tmp_path / 'missing.jsonl'}", "--out",
                               tmp_path / "out"], capsys)
    assert code == 2 and "/dev/null: not a regular file" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.bmm-work").exists()
