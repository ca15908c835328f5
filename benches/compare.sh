#!/usr/bin/env bash
# Side-by-side pgbench comparison: direct PostgreSQL, PgBouncer and pgweir, in one interleaved run, using the
# shared harness ../shared/bench/peers.sh. Extra arguments are passed on (e.g. --quick, --rounds 3 --duration 20).
#
#   benches/compare.sh                         transaction pooling, the harness's default workloads and client counts
#   PGWEIR_POOL_MODE=session benches/compare.sh --clients 16 --tpcb-clients 16 --churn-clients 16 \
#       --workloads "select extended prepared tpcb churn"      session pooling (clients <= --pool-size)
#   PGWEIR_FLOOR=1 benches/compare.sh          also the txn_floor example (examples/txn_floor.rs): a tokio pooler that
#                                              only forwards, the least CPU per transaction to read pgweir's against
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
harness="${BENCH_HARNESS:-$here/../shared/bench/peers.sh}"
# PGWEIR_BIN=<binary> (e.g. target/pgo/pgweir from benches/pgo-build.sh) benchmarks that build instead.
if [ -z "${PGWEIR_BIN:-}" ]; then cargo build --release --manifest-path "$here/Cargo.toml"; fi
export PGWEIR_POOL_MODE="${PGWEIR_POOL_MODE:-transaction}"
floor=()
if [ "${PGWEIR_FLOOR:-0}" = 1 ]; then
  cargo build --release --manifest-path "$here/Cargo.toml" --example txn_floor
  floor=(--extra-name floor --extra-port 55420 --extra-cmd "bash '$here/benches/floor-bench-target.sh'")
fi
exec "$harness" --peers "direct pgbouncer" \
  --extra-name pgweir --extra-port 55410 \
  --extra-cmd "bash '$here/benches/pgweir-bench-target.sh'" \
  "${floor[@]}" "$@"
