// node-postgres against pgweir in transaction mode: named statements (after its first use node-postgres sends only
// Bind/Execute, trusting the server to have the statement; here the same name has a different text in each
// client), unnamed parameterized queries, transactions, an error inside a transaction (its insert rolled back),
// per-client settings (application_name, search_path). No COPY, cursor or cancel: those need packages beyond `pg`.
// With PGWEIR_CHECK_MAX_PREPARED=N, no server connection ever holds more than N named statements.
//
// usage: node pg_check.js HOST PORT USER PASSWORD DATABASE CLIENTS ROUNDS
// prints 'ok ... servers=N' (N: server connections seen) or fails (exit 1).
const { Client } = require('pg');

const [host, port, user, password, database, clients, rounds] = process.argv.slice(2);
const maxPrepared = Number(process.env.PGWEIR_CHECK_MAX_PREPARED || 0);
const pids = new Set();

async function client(i) {
  const c = new Client({ host, port: Number(port), user, password, database, ssl: false,
    application_name: `node-pg-${i}` });
  await c.connect();
  try {
    // Schema s<i> has a table `who` that holds i: an unqualified name resolves through this client's path.
    await c.query(`SET search_path TO s${i}, public`);
    for (let r = 0; r < Number(rounds); r++) {
      // One name, a different text in each client.
      const own = await c.query({ name: 'own',
        text: `SELECT $1::int * 1000 + $2::int AS v, ${i} AS me, current_setting('application_name') AS app`,
        values: [i, r] });
      const row = own.rows[0];
      if (row.v !== i * 1000 + r || row.me !== i) throw new Error(`client ${i} round ${r}: got ${JSON.stringify(row)}`);
      if (row.app !== `node-pg-${i}`) throw new Error(`client ${i}: application_name ${row.app}`);
      // One name and one text in every client, resolved through each client's search_path.
      const who = (await c.query({ name: 'who', text: 'SELECT v FROM who' })).rows[0].v;
      if (who !== i) throw new Error(`client ${i}: another client's schema (${who})`);
      const t = await c.query("SELECT $1::text || '-' || $2::int AS t", [`c${i}`, r]);
      if (t.rows[0].t !== `c${i}-${r}`) throw new Error(`client ${i}: ${t.rows[0].t}`);
      if (maxPrepared) {
        // No values: the simple query protocol, nothing prepared.
        const held = (await c.query('SELECT count(*)::int AS n FROM pg_prepared_statements')).rows[0].n;
        if (held > maxPrepared) throw new Error(`a server connection holds ${held} named statements`);
      }
      await c.query('BEGIN');
      const p1 = (await c.query({ name: 'pid', text: 'SELECT pg_backend_pid() AS p' })).rows[0].p;
      await c.query({ name: 'ins', text: "INSERT INTO drv_items(driver, client, n) VALUES ('node-pg', $1, $2)", values: [i, r] });
      const p2 = (await c.query({ name: 'pid', text: 'SELECT pg_backend_pid() AS p' })).rows[0].p;
      await c.query('COMMIT');
      if (p1 !== p2) throw new Error('a transaction keeps its server connection');
      pids.add(p1);
      if (r % 7 === 3) {
        await c.query('BEGIN');
        await c.query({ name: 'ins', text: "INSERT INTO drv_items(driver, client, n) VALUES ('node-pg', $1, $2)", values: [i, -1] });
        let failed = false;
        try {
          await c.query({ name: 'div', text: 'SELECT 1 / $1::int AS x', values: [0] });
        } catch (e) {
          if (e.code !== '22012') throw e;
          failed = true;
        }
        await c.query('ROLLBACK');
        if (!failed) throw new Error('division by zero succeeded');
      }
    }
    const n = await c.query({ name: 'count', text: "SELECT count(*)::int AS n FROM drv_items WHERE driver = 'node-pg' AND client = $1", values: [i] });
    if (n.rows[0].n !== Number(rounds)) throw new Error(`client ${i}: ${n.rows[0].n} rows`);
  } finally {
    await c.end();
  }
}

(async () => {
  const all = [];
  for (let i = 0; i < Number(clients); i++) all.push(client(i));
  await Promise.all(all);
  console.log(`ok node-postgres ${require('pg/package.json').version}: ${clients} clients, ${clients * rounds} rounds, servers=${pids.size}`);
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
