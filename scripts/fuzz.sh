#!/usr/bin/env bash
# Coverage-guided fuzzing of lorafuse's parsers with cargo-fuzz (libFuzzer). docs/reliability.md
# ("Fuzzing") describes the targets.
#
#   scripts/fuzz.sh --ci              build, then all targets for at most 120 s in all
#   scripts/fuzz.sh --long SECONDS    every target for SECONDS each
#   scripts/fuzz.sh --runs N          every target until N executions each
#
# Optional target names after the mode restrict the run (default: all of fuzz/fuzz_targets).
# Seed corpora are made from the fixtures under models/ into fuzz/corpus/<target>/ (kept between
# runs, never committed). Findings go to fuzz/artifacts/<target>/, logs to fuzz/artifacts/logs/.
# Exit status: 0 when no target found anything, 1 otherwise.
# Environment: FUZZ_SANITIZER (none|address, default none: the fuzzed code is safe Rust, and
# AddressSanitizer runs it 4-7x slower), FUZZ_RSS_MB (2048), FUZZ_TIMEOUT (seconds per input, 10).
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2
CI_SECONDS=120

cd "$(dirname "$0")/.."
ROOT=$PWD
FUZZ=$ROOT/fuzz
export CARGO_TARGET_DIR=$FUZZ/target
SAN=${FUZZ_SANITIZER:-none}

usage() {
	echo "usage: $0 --ci | --long SECONDS | --runs N  [TARGET...]" >&2
	exit 2
}

mode=${1:-}
case $mode in
--ci) shift ;;
--long | --runs)
	[[ ${2:-} =~ ^[0-9]+$ ]] || usage
	limit=$2
	shift 2
	;;
*) usage ;;
esac

if ! cargo +nightly --version >/dev/null 2>&1; then
	echo "################################################################" >&2
	echo "## fuzz.sh: SKIPPED - no nightly Rust toolchain (cargo +nightly)." >&2
	echo "## Install one with: rustup toolchain install nightly" >&2
	echo "################################################################" >&2
	echo "skipped"
	exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
	cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

if (($#)); then
	targets=("$@")
else
	targets=()
	for f in "$FUZZ"/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi
if [[ $mode == --ci ]]; then
	# libFuzzer needs about a second beyond -max_total_time (start, final stats).
	limit=$((CI_SECONDS / ${#targets[@]} - 2))
fi

# ---- build (debug assertions and overflow checks on, as cargo-fuzz does by default)
t0=$SECONDS
if (($# == 0)); then
	cargo +nightly fuzz build -s "$SAN"
else
	for t in "${targets[@]}"; do cargo +nightly fuzz build -s "$SAN" "$t"; done
fi
build_s=$((SECONDS - t0))
bin=$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release

# ---- seed corpora from the repository's fixtures
make_seeds() {
	local c=$FUZZ/corpus f
	mkdir -p "$c"/{safetensors,lora_keys,onnx,prompt_tags,npy,scheduler_config}
	# find's -size -1M means "0 MiB" (it rounds up): count bytes instead.
	while IFS= read -r f; do
		cp "$f" "$c/safetensors/seed-$(echo "${f#models/}" | tr / _)"
	done < <(find models -name '*.safetensors' -size -1048576c)
	while IFS= read -r f; do
		cp "$f" "$c/onnx/seed-$(echo "${f#models/}" | tr / _)"
	done < <(find models -name '*.onnx' -size -1048576c)
	while IFS= read -r f; do
		cp "$f" "$c/scheduler_config/seed-$(echo "${f#models/}" | tr / _)"
	done < <(find models -name scheduler_config.json)
	python3 "$ROOT/fuzz/seeds.py" "$c"
}
make_seeds

# ---- run (the targets make their scratch folders under TMPDIR)
TMPDIR=$(mktemp -d "${TMPDIR:-/tmp}/lorafuse-fuzz.XXXXXX")
export TMPDIR
trap 'rm -rf "$TMPDIR"' EXIT
case $mode in
--runs) budget=(-runs="$limit") ;;
*) budget=(-max_total_time="$limit") ;;
esac
mkdir -p "$FUZZ/artifacts/logs"
failed=0
rows=()
t0=$SECONDS
for t in "${targets[@]}"; do
	art=$FUZZ/artifacts/$t
	log=$FUZZ/artifacts/logs/$t.log
	mkdir -p "$art"
	s=$SECONDS
	rc=0
	"$bin/$t" "$FUZZ/corpus/$t" "${budget[@]}" -rss_limit_mb="${FUZZ_RSS_MB:-2048}" \
		-timeout="${FUZZ_TIMEOUT:-10}" -artifact_prefix="$art/" -print_final_stats=1 \
		>"$log" 2>&1 || rc=$?
	secs=$((SECONDS - s))
	execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
	[[ -n $execs ]] || execs=$(grep -o '^#[0-9]*' "$log" | tail -n1 | tr -d '#' || true)
	found=$(sed -n 's/.*Test unit written to //p' "$log")
	crashes=0 hangs=0
	if ((rc != 0)) || [[ -n $found ]]; then
		failed=1
		case $(basename "${found:-crash}") in
		timeout-*) hangs=1 ;;
		*) crashes=1 ;; # crash-*, oom-*, leak-*, or no artifact at all
		esac
		echo "== $t: exit status $rc, artifact ${found:-none}, log $log"
		grep -m1 -A12 -E 'panicked|ERROR: ' "$log" || true
	fi
	corpus=$(find "$FUZZ/corpus/$t" -type f | wc -l)
	rows+=("$(printf '%-17s %11s %8s %8s %6s %7s  %s' "$t" "${execs:-?}" "$secs" "$crashes" "$hangs" "$corpus" "${found:--}")")
done
run_s=$((SECONDS - t0))

printf '%-17s %11s %8s %8s %6s %7s  %s\n' target executions seconds crashes hangs corpus artifact
printf '%s\n' "${rows[@]}"
echo "build: ${build_s} s, run: ${run_s} s, sanitizer: $SAN"
exit $failed
