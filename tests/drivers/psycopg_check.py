"""psycopg 3 against pgweir in transaction mode: server-side prepared statements (prepare=True, and the automatic
ones after prepare_threshold uses), pipeline mode, COPY FROM STDIN, a server-side cursor, transactions, an error
inside a transaction (its insert rolled back), a cancel, per-client settings (application_name, search_path);
clients in threads. With PGWEIR_CHECK_MAX_PREPARED=N, no server connection ever holds more than N named
statements.

usage: psycopg_check.py HOST PORT USER PASSWORD DATABASE CLIENTS ROUNDS
prints 'ok ... servers=N' (N: server connections seen) or fails (exit 1)."""
import os
import sys
import threading
import time

import psycopg

errors = []
pids = set()
max_prepared = int(os.environ.get("PGWEIR_CHECK_MAX_PREPARED", "0"))


def client(i, args, rounds):
    host, port, user, password, database = args
    try:
        with psycopg.connect(host=host, port=port, user=user, password=password, dbname=database,
                             sslmode="disable", application_name=f"psycopg-{i}", autocommit=True,
                             prepare_threshold=2) as conn:
            # Schema s<i> has a table `who` that holds i: an unqualified name resolves through this client's path.
            conn.execute(f"SET search_path TO s{i}, public")
            for r in range(rounds):
                v, app = conn.execute("SELECT %s::int * 1000 + %s::int, current_setting('application_name')",
                                      (i, r), prepare=True).fetchone()
                assert v == i * 1000 + r, f"client {i} round {r}: got {v}"
                assert app == f"psycopg-{i}", f"client {i}: application_name {app}"
                # Same name and text in every client, resolved through each client's search_path.
                who = conn.execute("SELECT v FROM who", prepare=True).fetchone()[0]
                assert who == i, f"client {i}: another client's schema ({who})"
                # Prepared automatically from its third use (prepare_threshold).
                t = conn.execute("SELECT %s::text || '-' || %s::int", (f"c{i}", r)).fetchone()[0]
                assert t == f"c{i}-{r}", t
                if max_prepared:
                    # Unnamed (prepare=False): not counted itself.
                    held = conn.execute("SELECT count(*) FROM pg_prepared_statements", prepare=False).fetchone()[0]
                    assert held <= max_prepared, f"a server connection holds {held} named statements"
                with conn.transaction():
                    p1 = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
                    conn.execute("INSERT INTO drv_items(driver, client, n) VALUES ('psycopg', %s, %s)", (i, r),
                                 prepare=True)
                    p2 = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
                    assert p1 == p2, "a transaction keeps its server connection"
                    pids.add(p1)
                if r == 5:
                    # A cancel from another thread must reach this client's query and no other.
                    timer = threading.Timer(1.0, conn.cancel_safe)
                    started = time.monotonic()
                    timer.start()
                    try:
                        conn.execute("SELECT pg_sleep(30)")
                        raise AssertionError("pg_sleep(30) was not cancelled")
                    except psycopg.errors.QueryCanceled:
                        pass
                    timer.join()
                    took = time.monotonic() - started
                    assert took < 10, f"client {i}: the cancel took {took:.1f} s"
                    assert conn.execute("SELECT %s::int", (i,)).fetchone()[0] == i
                if r % 7 == 3:
                    try:
                        with conn.transaction():
                            conn.execute("INSERT INTO drv_items(driver, client, n) VALUES ('psycopg', %s, -1)",
                                         (i,), prepare=True)
                            conn.execute("SELECT 1 / %s::int", (0,), prepare=True)
                        raise AssertionError("division by zero succeeded")
                    except psycopg.errors.DivisionByZero:
                        pass
            # Pipeline mode: many statements sent before the first result is read.
            with conn.pipeline():
                curs = [conn.execute("SELECT %s::int * 2", (k,), prepare=True) for k in range(20)]
                for k, cur in enumerate(curs):
                    assert cur.fetchone()[0] == 2 * k
                with conn.cursor() as cur:
                    cur.executemany("INSERT INTO drv_items(driver, client, n) VALUES ('psycopg', %s, %s)",
                                    [(i, 10000 + k) for k in range(20)])
            # COPY FROM STDIN, and a server-side cursor (DECLARE, then FETCH a few rows at a time).
            with conn.cursor() as cur:
                with cur.copy("COPY public.drv_items (driver, client, n) FROM STDIN") as copy:
                    for k in range(10):
                        copy.write_row(("psycopg", i, 20000 + k))
            with conn.transaction():
                with conn.cursor(name=f"series_{i}") as cur:
                    cur.itersize = 7
                    cur.execute("SELECT n FROM generate_series(1, 50) n")
                    got = [row[0] for row in cur]
            assert got == list(range(1, 51)), got
            n = conn.execute("SELECT count(*) FROM drv_items WHERE driver = 'psycopg' AND client = %s",
                             (i,)).fetchone()[0]
            assert n == rounds + 30, f"client {i}: {n} rows"
    except Exception as e:  # reported by the main thread
        errors.append(f"client {i}: {e!r}")


def main():
    args = sys.argv[1:6]
    clients, rounds = int(sys.argv[6]), int(sys.argv[7])
    threads = [threading.Thread(target=client, args=(i, args, rounds)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print("\n".join(errors), file=sys.stderr)
        sys.exit(1)
    print(f"ok psycopg {psycopg.__version__}: {clients} clients, {clients * rounds} rounds, servers={len(pids)}")


main()
