"""asyncpg against pgweir in transaction mode: named prepared statements (asyncpg's statement cache), explicit
prepare, executemany (one pipelined batch), COPY FROM STDIN, a cursor, transactions, an error inside a transaction
(its insert rolled back), a query timeout (a cancel), per-client settings (application_name, search_path).

usage: asyncpg_check.py HOST PORT USER PASSWORD DATABASE CLIENTS ROUNDS
prints 'ok ... servers=N' (N: server connections seen) or fails (exit 1)."""
import asyncio
import sys
import time

import asyncpg

pids = set()


async def client(i, args, rounds):
    host, port, user, password, database = args
    conn = await asyncpg.connect(host=host, port=int(port), user=user, password=password, database=database,
                                 ssl=False, server_settings={"application_name": f"asyncpg-{i}"})
    try:
        # Schema s<i> has a table `who` that holds i: an unqualified name resolves through this client's path.
        await conn.execute(f"SET search_path TO s{i}, public")
        # asyncpg names the statements it prepares with one counter per process (__asyncpg_stmt_N__).
        own = await conn.prepare("SELECT $1::int * 1000 + $2::int AS v, current_setting('application_name') AS app")
        slow = await conn.prepare("SELECT pg_sleep(30)")
        for r in range(rounds):
            row = await own.fetchrow(i, r)
            assert row["v"] == i * 1000 + r, f"client {i} round {r}: got {row['v']}"
            assert row["app"] == f"asyncpg-{i}", f"client {i}: application_name {row['app']}"
            # Same text in every client, resolved through each client's search_path.
            assert await conn.fetchval("SELECT v FROM who") == i, f"client {i}: another client's schema"
            # The statement cache: the same text again is Bind/Execute of a statement prepared earlier.
            assert await conn.fetchval("SELECT $1::text || '-' || $2::int", f"c{i}", r) == f"c{i}-{r}"
            async with conn.transaction():
                p1 = await conn.fetchval("SELECT pg_backend_pid()")
                await conn.execute("INSERT INTO drv_items(driver, client, n) VALUES ('asyncpg', $1, $2)", i, r)
                p2 = await conn.fetchval("SELECT pg_backend_pid()")
                assert p1 == p2, "a transaction keeps its server connection"
                pids.add(p1)
            if r == 5:
                # A timeout: asyncpg sends a CancelRequest, which must reach this client's query (and no other):
                # the next query then runs at once, not after the 30 s sleep.
                started = time.monotonic()
                try:
                    await slow.fetchval(timeout=1)
                    raise AssertionError("pg_sleep(30) was not cancelled")
                except asyncio.TimeoutError:
                    pass
                assert await conn.fetchval("SELECT $1::int", i) == i
                took = time.monotonic() - started
                assert took < 10, f"client {i}: the cancel took {took:.1f} s"
            if r % 7 == 3:
                try:
                    async with conn.transaction():
                        await conn.execute("INSERT INTO drv_items(driver, client, n) VALUES ('asyncpg', $1, -1)", i)
                        await conn.fetchval("SELECT 1 / $1::int", 0)
                    raise AssertionError("division by zero succeeded")
                except asyncpg.exceptions.DivisionByZeroError:
                    pass
        await conn.executemany("INSERT INTO drv_items(driver, client, n) VALUES ('asyncpg', $1, $2)",
                               [(i, 10000 + k) for k in range(20)])
        # COPY FROM STDIN, and a cursor read a few rows at a time (Execute with a row limit, PortalSuspended).
        await conn.copy_records_to_table("drv_items", columns=["driver", "client", "n"], schema_name="public",
                                         records=[("asyncpg", i, 20000 + k) for k in range(10)])
        async with conn.transaction():
            got = [r[0] async for r in conn.cursor("SELECT n FROM generate_series(1, 50) n WHERE n > $1", 0,
                                                   prefetch=7)]
        assert got == list(range(1, 51)), got
        n = await conn.fetchval("SELECT count(*) FROM drv_items WHERE driver = 'asyncpg' AND client = $1", i)
        assert n == rounds + 30, f"client {i}: {n} rows"
        # The same text prepared again (asyncpg prepares it under a new name), and the session reset asyncpg's
        # pool runs (advisory unlock, CLOSE ALL, UNLISTEN *, RESET ALL).
        stmt = await conn.prepare("SELECT $1::int + 1")
        assert await stmt.fetchval(41) == 42
        del stmt
        await conn.reset()
        assert await conn.fetchval("SELECT $1::int + 1", 1) == 2
    finally:
        await conn.close()
    return rounds


async def main():
    args = sys.argv[1:6]
    clients, rounds = int(sys.argv[6]), int(sys.argv[7])
    done = await asyncio.gather(*(client(i, args, rounds) for i in range(clients)))
    print(f"ok asyncpg {asyncpg.__version__}: {len(done)} clients, {sum(done)} rounds, servers={len(pids)}")


asyncio.run(main())
