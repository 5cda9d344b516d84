# Shared by bench/run.sh and bench/run_decoder.sh (sourced; needs $RUN).
log() { echo "== $*" >&2; }

timed() {  # timed NAME CMD...: wall seconds (and peak RSS in KB, with GNU time) of a step into $RUN/scores/NAME.*
  # Recorded once, by the run that did the work: a rerun finds the stage done and would time a no-op (delete
  # $RUN/scores/*.seconds to measure again).
  local name=$1; shift; local t0=$SECONDS f="$RUN/scores/$name"
  if [ -s "$f.seconds" ]; then "$@"; return; fi
  if [ -x /usr/bin/time ]; then /usr/bin/time -f "%M" -o "$f.maxrss_kb.tmp" "$@"; else "$@"; fi
  [ -f "$f.maxrss_kb.tmp" ] && mv "$f.maxrss_kb.tmp" "$f.maxrss_kb"
  echo $((SECONDS - t0)) > "$f.seconds"
}
