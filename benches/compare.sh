#!/usr/bin/env bash
# Side-by-side pgbench comparison: direct PostgreSQL, PgBouncer and pgweir, in one interleaved run, using the
# shared harness ../shared/bench/peers.sh. Extra arguments are passed on (e.g. --quick, --rounds 3 --duration 20).
#
#   benches/compare.sh                         transaction pooling, the harness's default workloads and client counts
#   PGWEIR_POOL_MODE=session benches/compare.sh --clients 16 --tpcb-clients 16 --churn-clients 16 \
#       --workloads "select extended prepared tpcb churn"      session pooling (clients <= --pool-size)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
harness="${BENCH_HARNESS:-$here/../shared/bench/peers.sh}"
cargo build --release --manifest-path "$here/Cargo.toml"
export PGWEIR_POOL_MODE="${PGWEIR_POOL_MODE:-transaction}"
exec "$harness" --peers "direct pgbouncer" \
  --extra-name pgweir --extra-port 55410 \
  --extra-cmd "bash '$here/benches/pgweir-bench-target.sh'" \
  "$@"
