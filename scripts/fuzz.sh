#!/usr/bin/env bash
# Fuzzes the 1:1 NAT (fuzz/fuzz_targets/nat.rs) with libFuzzer for
# FUZZ_SECONDS (default 60) on the nightly toolchain. Installs cargo-fuzz
# when it is missing. The corpus starts from the captured packets in
# tests/fixtures/ and grows in fuzz/corpus/nat (not committed); a crash is
# written to fuzz/artifacts/nat/ and makes this script fail.
#
#   FUZZ_SECONDS=600 scripts/fuzz.sh
#   FUZZ_SANITIZER=none scripts/fuzz.sh     # faster, no AddressSanitizer
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
seconds="${FUZZ_SECONDS:-60}"
sanitizer="${FUZZ_SANITIZER:-address}"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

corpus="$repo/fuzz/corpus/nat"
mkdir -p "$corpus"
# Seeds: each captured packet with control bytes 0x00 (as is) and 0x01
# (masquerade).
python3 - "$repo/tests/fixtures" "$corpus" <<'PY'
import pathlib, sys
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for f in sorted(src.glob("*.hex")):
    p = bytes.fromhex(f.read_text().strip())
    for ctl in (0, 1):
        (dst / f"{f.stem}-{ctl}").write_bytes(bytes([ctl]) + p)
PY

cd "$repo/fuzz"
exec cargo +nightly fuzz run --sanitizer "$sanitizer" nat "$corpus" -- \
    -max_total_time="$seconds" -print_final_stats=1
