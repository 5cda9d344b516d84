"""The lm-evaluation-harness scorer, offline: a tiny multiple-choice task (a JSONL file and a task YAML written here)
on a tiny Llama; the score of each trial is lm-eval's own accuracy on the resident model, and the model kept at
--out scores the same when lm-eval loads it from disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="the [lm-eval] extra is not installed")

from conftest import ready_work  # noqa: E402

from bmm_cli.atomic import read_jsonl  # noqa: E402
from bmm_cli.errors import InputError  # noqa: E402
from bmm_cli.search import search  # noqa: E402

TASK = """task: bmm_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_task(root: Path) -> Path:
    d = root / "tasks"
    d.mkdir()
    with open(d / "data.jsonl", "w") as fh:
        for i in range(12):
            choices = [f"w{i + 3}", f"w{40 + i}", f"w{70 - i}"]
            fh.write(json.dumps({"question": f"w{i} w{i + 1} w{i + 2}", "choices": choices, "label": i % 3}) + "\n")
    (d / "bmm_tiny.yaml").write_text(TASK.format(data=d / "data.jsonl"))
    return d


@pytest.mark.slow
def test_lm_eval_scorer_in_memory(family, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    work = ready_work(family, "llama", tmp_path / "w")
    tasks = write_task(tmp_path)
    out = tmp_path / "best"
    res = search(work, "ta", "free", out=out, lm_eval="bmm_tiny", lm_eval_limit=10, lm_eval_include=tasks,
                 trials=3, initial=3, blocks=1, device="cpu")
    assert res["in_memory"] and res["trials"] == 3 and res["trials_failed"] == 0
    recs = read_jsonl(work / "search-ta-free" / "trials.jsonl")
    for r in recs:
        m = r["metrics"]
        assert r["score"] == m["bmm_tiny/acc,none"] == m["bmm_tiny/primary"]  # the first metric of metric_list
        assert 0 <= m["bmm_tiny/acc_norm,none"] <= 1 and m["bmm_tiny/sample_len"] == 10
        assert r["score"] * 10 == pytest.approx(round(r["score"] * 10))  # an accuracy over 10 examples

    # lm-eval on the kept model, loaded from disk in the ordinary way, gives the best trial's score
    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    lm = HFLM(pretrained=model, tokenizer=transformers.AutoTokenizer.from_pretrained(str(out)), device="cpu",
              batch_size=8)
    again = simple_evaluate(model=lm, tasks=["bmm_tiny"], limit=10, task_manager=TaskManager(include_path=str(tasks)),
                            log_samples=False, bootstrap_iters=0)
    assert again["results"]["bmm_tiny"]["acc,none"] == res["best_score"]


def test_lm_eval_options_are_checked_up_front(family, tmp_path):
    work = ready_work(family, "llama", tmp_path / "w")
    tasks = write_task(tmp_path)
    with pytest.raises(InputError, match="unknown task.*no_such_task"):
        search(work, "ta", "free", out=tmp_path / "o", lm_eval="bmm_tiny,no_such_task", lm_eval_include=tasks)
    with pytest.raises(InputError, match="--lm-eval-include .*not a directory"):
        search(work, "ta", "free", out=tmp_path / "o", lm_eval="bmm_tiny", lm_eval_include=tmp_path / "nope")
    with pytest.raises(InputError, match="go with --lm-eval"):
        search(work, "ta", "free", "echo 1", out=tmp_path / "o", lm_eval_limit=5)
    assert not (work / "search-ta-free").exists() and not (tmp_path / "o").exists()
