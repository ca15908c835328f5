#!/usr/bin/env bash
# The txn_floor example (examples/txn_floor.rs: a transaction pooler that only forwards) as an extra target of
# ../shared/bench/peers.sh: the least CPU per transaction a pooler on tokio can spend, to read pgweir's figures
# against. Builds the example if needed and runs it in the foreground on the harness's BENCH_* variables.
# -M prepared rows fail on it (it does not move named statements between connections).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin="${FLOOR_BIN:-$here/target/release/examples/txn_floor}"
if [ ! -x "$bin" ]; then
  (cd "$here" && cargo build --release --example txn_floor >&2)
fi
exec "$bin"
