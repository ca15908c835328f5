#!/usr/bin/env bash
# pgweir as an extra target of ../shared/bench/peers.sh: writes a config from the BENCH_* variables and runs the
# release binary in the foreground. Clients log in as bench/bench to database bench (auth = $BENCH_AUTH).
# PGWEIR_POOL_MODE=session|transaction (default transaction, as the harness runs every pooler).
# PGWEIR_SQL_POLICY=false turns SQL policy off (to measure what it costs); PGWEIR_WORKERS sets proxy.worker_threads
# (default 1, pgweir's default: one event loop; 0: one worker per CPU). The harness's BENCH_WORKERS (threads for
# multi-threaded poolers, nproc by default) is not used: pgweir runs as configured by default.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin="${PGWEIR_BIN:-$here/target/release/pgweir}"
mkdir -p "$BENCH_CONF_DIR"
verifier=$("$bin" hash-password bench --md5-user bench)
scram=$(sed -n 1p <<<"$verifier")
md5=$(sed -n 2p <<<"$verifier")
case "${BENCH_AUTH:-md5}" in
  md5) auth='["md5"]' ;;
  *) auth='["scram-sha-256"]' ;;
esac
cat > "$BENCH_CONF_DIR/pgweir.toml" <<TOML
[proxy]
listen = "127.0.0.1:$BENCH_LISTEN_PORT"
default_tenant = "bench"
max_client_connections = 20000
sql_policy = ${PGWEIR_SQL_POLICY:-true}
worker_threads = ${PGWEIR_WORKERS:-1}

[pool]
max_size = $BENCH_POOL_SIZE
checkout_timeout = "60s"

[clusters.bench]
host = "$BENCH_PG_HOST"
port = $BENCH_PG_PORT

[[tenants]]
id = "bench"
database = "bench"
cluster = "bench"
backend_database = "$BENCH_PG_DB"
backend_user = "$BENCH_PG_USER"
backend_password = "$BENCH_PG_PASSWORD"
auth = $auth
pool_mode = "${PGWEIR_POOL_MODE:-transaction}"

[[tenants.users]]
name = "bench"
password = "$scram"
md5 = "$md5"
TOML
export PGWEIR_LOG=${PGWEIR_LOG:-warn}
exec "$bin" serve --config "$BENCH_CONF_DIR/pgweir.toml"
