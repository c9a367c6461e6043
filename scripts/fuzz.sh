#!/usr/bin/env bash
# Fuzzes the core with libFuzzer on the nightly toolchain: every target in
# fuzz/fuzz_targets/ (or the ones named as arguments), FUZZ_SECONDS each
# (default 60). Installs cargo-fuzz when it is missing. Each target's corpus
# grows in fuzz/corpus/<target> (not committed); a crash is written to
# fuzz/artifacts/<target>/ and makes this script fail.
#
# Seeds: `nat` starts from the captured packets in tests/fixtures/*.hex,
# `ike_message` from the IKE messages strongSwan sent in
# tests/fixtures/ike/*.txt.
#
#   scripts/fuzz.sh                          # every target, 60 s each
#   FUZZ_SECONDS=600 scripts/fuzz.sh nat     # one target, 10 min
#   FUZZ_SANITIZER=none scripts/fuzz.sh      # faster, no AddressSanitizer
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
seconds="${FUZZ_SECONDS:-60}"
sanitizer="${FUZZ_SANITIZER:-address}"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for f in "$repo"/fuzz/fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi

seed() {
    local target="$1" corpus="$2"
    case "$target" in
    nat)
        # Each captured packet with control bytes 0x00 (as is) and 0x01
        # (masquerade).
        python3 - "$repo/tests/fixtures" "$corpus" <<'PY'
import pathlib, sys
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for f in sorted(src.glob("*.hex")):
    p = bytes.fromhex(f.read_text().strip())
    for ctl in (0, 1):
        (dst / f"{f.stem}-{ctl}").write_bytes(bytes([ctl]) + p)
PY
        ;;
    ike_message)
        # Each IKE message of the fixtures, as received on port 500 (control
        # byte 0x00) and on 4500 with the non-ESP marker (0x03).
        python3 - "$repo/tests/fixtures/ike" "$corpus" <<'PY'
import pathlib, sys
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for f in sorted(src.glob("*.txt")):
    for line in f.read_text().splitlines():
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if key.endswith(("_request", "_response")) and value:
            for ctl in (0, 3):
                (dst / f"{f.stem}-{key}-{ctl}").write_bytes(bytes([ctl]) + bytes.fromhex(value))
PY
        ;;
    esac
}

cd "$repo/fuzz"
for target in "${targets[@]}"; do
    corpus="$repo/fuzz/corpus/$target"
    mkdir -p "$corpus"
    seed "$target" "$corpus"
    echo "== fuzzing $target for ${seconds}s"
    cargo +nightly fuzz run --sanitizer "$sanitizer" "$target" "$corpus" -- \
        -max_total_time="$seconds" -print_final_stats=1
done
