#!/usr/bin/env bash
# Side-by-side pgbench comparison: direct PostgreSQL, PgBouncer and pgweir, in one interleaved run, using the
# shared harness ../shared/bench/peers.sh. Extra arguments are passed on (e.g. --quick, --rounds 3 --duration 20).
#
# pgweir pools in session mode for now, so keep --clients at or under --pool-size (the harness's default client
# counts go up to 256: pass --clients "16" --tpcb-clients "16" --churn-clients "16" with --pool-size 20).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
harness="${BENCH_HARNESS:-$here/../shared/bench/peers.sh}"
cargo build --release --manifest-path "$here/Cargo.toml"
exec "$harness" --peers "direct pgbouncer" \
  --extra-name pgweir --extra-port 55410 \
  --extra-cmd "bash '$here/benches/pgweir-bench-target.sh'" \
  --clients "16" --tpcb-clients "16" --churn-clients "16" --pool-size 20 \
  --workloads "select extended prepared tpcb churn" \
  "$@"
