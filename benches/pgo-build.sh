#!/usr/bin/env bash
# Profile-guided (PGO) release build of pgweir, the build to deploy and to benchmark.
#
#   benches/pgo-build.sh            -> target/pgo/pgweir (and target/pgo/pgweir.profdata)
#   PGWEIR_BIN=target/pgo/pgweir benches/compare.sh ...   benchmark that binary side by side
#
# Why: pgweir's hot path is a handful of async state machines whose hot blocks sit between cold ones (errors,
# COPY, refusals, timeouts). Without a profile LLVM lays them out evenly, and a transaction touches far more
# instruction-cache lines than it runs instructions for. Measured with callgrind (pgbench -S, 16 clients, pool 20):
# 7,136 -> 5,842 instructions and 210 -> 63 L1i misses per transaction; pgweir's user CPU per transaction fell by
# 10-20 % in a side-by-side run. See docs/ARCHITECTURE.md ("Performance").
#
# Steps: an instrumented build (target/pgo/gen); the instrumented pgweir as the only target of the side-by-side
# harness (benches/compare.sh with ../shared/bench/peers.sh: throw-away PostgreSQL 15 cluster, pgbench data,
# select / extended / prepared at 16, 64 and 256 clients, TPC-B, connection churn; it stops pgweir with SIGTERM, and
# that clean exit writes the profile); then the final build with the merged profile (target/pgo/use). Needs the
# llvm-tools rustup component (installed when missing) and what the harness needs. PGO_SECONDS sets the seconds per
# pgbench run (default 4).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out="$here/target/pgo"
secs="${PGO_SECONDS:-4}"
mkdir -p "$out"

sysroot=$(rustc --print sysroot)
profdata=$(find "$sysroot" -name llvm-profdata -type f 2>/dev/null | head -n1)
if [ -z "$profdata" ]; then
  rustup component add llvm-tools
  profdata=$(find "$sysroot" -name llvm-profdata -type f | head -n1)
fi

echo "== instrumented build"
rm -rf "$out/raw"
CARGO_TARGET_DIR="$out/gen" RUSTFLAGS="-Cprofile-generate=$out/raw" \
  cargo build --release --bin pgweir --manifest-path "$here/Cargo.toml"
# Build scripts ran instrumented too: only pgweir's own runs below make the profile.
rm -rf "$out/raw"

echo "== training run"
rm -rf "$out/train"
# compare.sh runs the harness with pgweir as its extra target; the later --peers "" drops direct PG and PgBouncer.
PGWEIR_BIN="$out/gen/release/pgweir" PGWEIR_FLOOR=0 "$here/benches/compare.sh" --peers "" --rounds 1 \
  --duration "$secs" --workloads "select extended prepared tpcb churn" --out "$out/train"
"$profdata" merge -o "$out/pgweir.profdata" "$out"/raw/*.profraw
# Cargo does not see a profile's contents, only the flag: a path named by the profile's hash rebuilds every crate
# when the profile changes (the same path would leave the last build's binary in place).
sum=$(sha256sum "$out/pgweir.profdata" | cut -c1-16)
rm -f "$out"/pgweir-*.profdata
cp "$out/pgweir.profdata" "$out/pgweir-$sum.profdata"

echo "== optimized build"
# The profile marks functions hot (.text.hot.*) or cold (.text.unlikely.*); rust-lld mixes them back into one .text
# unless told to keep the prefixes, which puts the hot ones together (callgrind, pgbench -S 16 clients: 71 -> 49 L1i
# misses per transaction, same profile).
CARGO_TARGET_DIR="$out/use" RUSTFLAGS="-Cprofile-use=$out/pgweir-$sum.profdata -Clink-arg=-Wl,-z,keep-text-section-prefix" \
  cargo build --release --bin pgweir --manifest-path "$here/Cargo.toml"
cp "$out/use/release/pgweir" "$out/pgweir"
echo "PGO build: $out/pgweir"
