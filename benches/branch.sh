#!/usr/bin/env bash
# Branch creation time and pause window by database size (issue 5): runs `pgweir dev` in a temp folder, creates a
# tenant, fills it with pgbench at each scale (7 ≈ 100 MB, 70 ≈ 1 GB), and creates branches with each copy strategy
# while a light pgbench load runs, printing what the operation reports.
#   benches/branch.sh [--scales "7 70"] [--strategies "auto wal_log file_copy"]
set -euo pipefail
scales="7 70"
strategies="auto wal_log file_copy"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --scales) scales="$2"; shift 2 ;;
    --strategies) strategies="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
root="$(cd "$(dirname "$0")/.." && pwd)"
bindir="$(pg_config --bindir 2>/dev/null || dirname "$(command -v pgbench)")"
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
work="$(mktemp -d /tmp/pgweir-branch-bench.XXXXXX)"
chmod 755 "$work"
port=$((20000 + RANDOM % 10000)); admin_port=$((port + 1))
token="bench-$(date +%s)-token"
PGWEIR_ADMIN_TOKEN="$token" "$root/target/release/pgweir" dev --data-dir "$work/dev" \
  --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin_port" >"$work/dev.log" 2>&1 &
dev=$!
trap 'kill -TERM $dev 2>/dev/null; wait $dev 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 120); do curl -fsS "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1 && break; sleep 0.5; done
api() { curl -sS -X "$1" -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
          "http://127.0.0.1:$admin_port$2" ${3:+-d "$3"}; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }
wait_op() {
  local op
  while :; do
    op="$(api GET "$1")"
    [[ "$(echo "$op" | json 'd["status"]')" != running ]] && break
    sleep 0.2
  done
  echo "$op"
}
printf '%-6s %-10s %-10s %10s %9s %9s %9s\n' scale strategy used source_MB pause_ms copy_ms total_ms
for scale in $scales; do
  url="$(api PUT "/v1/tenants/size$scale" '{}' | json 'd["connection_string"]')?sslmode=disable"
  "$bindir/pgbench" -i -q -s "$scale" "$url" >/dev/null 2>&1
  for strategy in $strategies; do
    body="{\"name\": \"b-${strategy//_/-}\", \"pause_timeout_ms\": 600000"
    [[ "$strategy" != auto ]] && body="$body, \"strategy\": \"$strategy\""
    body="$body}"
    # A light load on the parent while the branch is cut (4 clients, rate-limited).
    # (Long enough to outlast the copy; waited for, so that its failure count is reported.)
    "$bindir/pgbench" -n -c 4 -j 2 -R 200 -T $((15 + scale / 2)) "$url" >"$work/load.log" 2>&1 &
    load=$!
    sleep 2
    started="$(api POST "/v1/tenants/size$scale/branches" "$body")"
    href="$(echo "$started" | json 'd["operation"]["href"]')" || { echo "refused: $started"; exit 1; }
    op="$(wait_op "$href")"
    wait $load || true
    echo "$op" | json '"%-6s %-10s %-10s %10.0f %9d %9d %9d" % ('"$scale"', "'"$strategy"'", d["result"]["strategy"], d["result"]["source_bytes"]/1e6, d["result"]["pause_ms"], d["result"]["copy_ms"], d["result"]["total_ms"]) if d["status"]=="succeeded" else "'"$scale $strategy"' FAILED: " + str(d["error"])'
    failed="$(grep -o 'number of failed transactions: [0-9]*' "$work/load.log" || true)"
    [[ -n "$failed" ]] && echo "       load during the cut: $failed"
    wait_op "$(api DELETE "/v1/tenants/size$scale/branches/b-${strategy//_/-}" | json 'd["operation"]["href"]')" >/dev/null
    sleep 2
  done
done
