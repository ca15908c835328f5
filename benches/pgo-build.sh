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
# Steps: an instrumented build (target/pgo/gen), a throw-away PostgreSQL 15 cluster with pgbench data, the
# instrumented pgweir in front of it in transaction mode, a pgbench mix (simple / extended / prepared at 16, 64 and
# 256 clients, TPC-B, connection churn), then the final build with the merged profile (target/pgo/use). Needs the
# llvm-tools rustup component (installed when missing), PostgreSQL 15's binaries and pgbench. Everything it starts
# is stopped on exit, also on failure. PGO_SECONDS sets the seconds per pgbench run (default 4).
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
bindir=$(pg_config --bindir 2>/dev/null || dirname "$(command -v initdb)")

echo "== instrumented build"
rm -rf "$out/raw"
CARGO_TARGET_DIR="$out/gen" RUSTFLAGS="-Cprofile-generate=$out/raw" \
  cargo build --release --bin pgweir --manifest-path "$here/Cargo.toml"
# Build scripts ran instrumented too: only pgweir's own runs below make the profile.
rm -rf "$out/raw"

tmp=$(mktemp -d)
pg_pid=""
pgweir_pid=""
cleanup() {
  if [ -n "$pgweir_pid" ]; then kill "$pgweir_pid" 2>/dev/null || true; fi
  if [ -n "$pg_pid" ]; then as_pg "$bindir/pg_ctl" -D "$tmp/data" -m immediate stop >/dev/null 2>&1 || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
if [ "$(id -u)" = 0 ]; then chown postgres "$tmp"; fi
chmod 755 "$tmp"
echo postgres >"$tmp/pw"
chmod 644 "$tmp/pw"

echo "== throw-away cluster"
pg_port=$(free_port)
as_pg "$bindir/initdb" -D "$tmp/data" -A md5 -U postgres --pwfile="$tmp/pw" >/dev/null
as_pg "$bindir/pg_ctl" -D "$tmp/data" -l "$tmp/pg.log" -w \
  -o "-p $pg_port -k $tmp -c listen_addresses=127.0.0.1 -c max_connections=300" start >/dev/null
pg_pid=started
export PGPASSWORD=postgres
psql -q -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -c "CREATE ROLE bench LOGIN PASSWORD 'bench'"
psql -q -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -c "CREATE DATABASE bench OWNER bench"
PGPASSWORD=bench pgbench -i -q -s 10 -h 127.0.0.1 -p "$pg_port" -U bench bench >/dev/null 2>&1

echo "== training run"
port=$(free_port)
BENCH_CONF_DIR="$tmp/conf" BENCH_LISTEN_PORT=$port BENCH_PG_HOST=127.0.0.1 BENCH_PG_PORT=$pg_port \
  BENCH_PG_USER=bench BENCH_PG_PASSWORD=bench BENCH_PG_DB=bench BENCH_POOL_SIZE=20 BENCH_AUTH=md5 \
  PGWEIR_BIN="$out/gen/release/pgweir" bash "$here/benches/pgweir-bench-target.sh" >"$tmp/pgweir.log" 2>&1 &
pgweir_pid=$!
for _ in $(seq 1 100); do
  if PGPASSWORD=bench psql -qAt -h 127.0.0.1 -p "$port" -U bench -d bench -c 'SELECT 1' >/dev/null 2>&1; then break; fi
  sleep 0.1
done
bench() {
  PGPASSWORD=bench pgbench -n -h 127.0.0.1 -p "$port" -U bench -j 2 -T "$secs" "$@" bench 2>&1 |
    grep -E '^tps' | head -n1 | sed "s/^/  $* : /"
}
for c in 16 64 256; do
  for m in simple extended prepared; do bench -c "$c" -S -M "$m"; done
done
bench -c 16
bench -c 64
bench -c 16 -C -S
bench -c 64 -C -S
# A clean shutdown writes the profile.
kill -INT "$pgweir_pid"
wait "$pgweir_pid" || true
pgweir_pid=""
"$profdata" merge -o "$out/pgweir.profdata" "$out"/raw/*.profraw

echo "== optimized build"
CARGO_TARGET_DIR="$out/use" RUSTFLAGS="-Cprofile-use=$out/pgweir.profdata" \
  cargo build --release --bin pgweir --manifest-path "$here/Cargo.toml"
cp "$out/use/release/pgweir" "$out/pgweir"
echo "PGO build: $out/pgweir"
