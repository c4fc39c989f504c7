#!/usr/bin/env bash
# Coverage-guided fuzzing of one altgrad reader (cargo-fuzz, libFuzzer, AddressSanitizer).
#
#   scripts/fuzz.sh TARGET SECONDS [libFuzzer flags…]   one target for SECONDS seconds
#   scripts/fuzz.sh all SECONDS                          every target in turn, SECONDS each
#   scripts/fuzz.sh list                                 the targets
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). One fuzzing process
# per target, in-process (no -jobs), with one rayon thread, so it shares the machine; runs of
# different targets may go at once (each has its own log, corpus and artifacts). The working
# corpus grows in fuzz/corpus/TARGET (git-ignored), starting from the committed seeds in
# fuzz/seeds/TARGET; crashes land in fuzz/artifacts/TARGET/ (copy each into
# fuzz/regressions/TARGET/ once fixed: `cargo test` replays them; the corpus may hold inputs cut
# from the fetched models, so rebuild a crash from synthetic content before committing it, as
# the tokenizer_json regressions were: nothing from models/ goes into git). The log of each run is
# fuzz/logs/TARGET.log and ends with libFuzzer's final statistics (executions, coverage).
# Not part of the default test command.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGETS="gguf dequant safetensors hf_model hf_config tokenizer_json tokens checkpoint attn"
if [ "${1:-}" = list ] || [ $# -lt 2 ]; then
  [ "${1:-}" = list ] || echo "usage: scripts/fuzz.sh TARGET|all SECONDS [libFuzzer flags]" >&2
  echo "$TARGETS"
  [ "${1:-}" = list ]; exit $?
fi
target=$1
secs=$2
shift 2
if [ "$target" = all ]; then
  for t in $TARGETS; do "$0" "$t" "$secs" "$@" || echo "fuzz.sh: $t stopped with a finding (see fuzz/logs/$t.log)"; done
  exit 0
fi
case " $TARGETS " in *" $target "*) ;; *) echo "unknown target $target (targets: $TARGETS)" >&2; exit 2 ;; esac
mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target" fuzz/logs
# fetched model files seed the git-ignored working corpus, never fuzz/seeds/ (they stay out of git)
if [ "$target" = hf_config ] && [ -f models/minilm/config.json ]; then
  cp models/minilm/config.json fuzz/corpus/hf_config/ok_minilm.json
fi
export RAYON_NUM_THREADS=1
if [ "${FUZZ_NO_BUILD:-0}" != 1 ]; then
  (cd fuzz && cargo +nightly fuzz build "$target" >/dev/null)
fi
bin="fuzz/target/x86_64-unknown-linux-gnu/release/$target"
log="fuzz/logs/$target.log"
echo "fuzz.sh: $target for $secs s (or ${FUZZ_RUNS:-10000000} executions), log $log" >&2
set +e
# in-process (no -jobs: a -jobs child would write fuzz-0.log in the shared cwd)
(cd fuzz && "../$bin" "corpus/$target" "seeds/$target" -artifact_prefix="artifacts/$target/" \
  -max_total_time="$secs" -runs="${FUZZ_RUNS:-10000000}" -timeout=20 \
  -rss_limit_mb=3072 -malloc_limit_mb=3072 -max_len=65536 -print_final_stats=1 "$@") >"$log.run" 2>&1
rc=$?
set -e
mv "$log.run" "$log"
grep -E "stat::number_of_executed_units|cov: " "$log" | tail -2 >&2 || true
if ls "fuzz/artifacts/$target"/* >/dev/null 2>&1; then
  echo "fuzz.sh: $target: findings in fuzz/artifacts/$target/" >&2
  exit 1
fi
exit $rc
