// node-postgres against pgweir in transaction mode: named statements (after its first use node-postgres sends only
// Bind/Execute, trusting the server to have the statement), unnamed parameterized queries, transactions, an error
// inside a transaction, per-client settings.
//
// usage: node pg_check.js HOST PORT USER PASSWORD DATABASE CLIENTS ROUNDS; prints 'ok ...' or fails (exit 1).
const { Client } = require('pg');

const [host, port, user, password, database, clients, rounds] = process.argv.slice(2);

async function client(i) {
  const c = new Client({ host, port: Number(port), user, password, database, ssl: false,
    application_name: `node-pg-${i}` });
  await c.connect();
  try {
    for (let r = 0; r < Number(rounds); r++) {
      const own = await c.query({ name: 'own', text: "SELECT $1::int * 1000 + $2::int AS v, current_setting('application_name') AS app",
        values: [i, r] });
      if (own.rows[0].v !== i * 1000 + r) throw new Error(`client ${i} round ${r}: got ${own.rows[0].v}`);
      if (own.rows[0].app !== `node-pg-${i}`) throw new Error(`client ${i}: application_name ${own.rows[0].app}`);
      const t = await c.query("SELECT $1::text || '-' || $2::int AS t", [`c${i}`, r]);
      if (t.rows[0].t !== `c${i}-${r}`) throw new Error(`client ${i}: ${t.rows[0].t}`);
      await c.query('BEGIN');
      const p1 = (await c.query({ name: 'pid', text: 'SELECT pg_backend_pid() AS p' })).rows[0].p;
      await c.query({ name: 'ins', text: "INSERT INTO drv_items(driver, client, n) VALUES ('node-pg', $1, $2)", values: [i, r] });
      const p2 = (await c.query({ name: 'pid', text: 'SELECT pg_backend_pid() AS p' })).rows[0].p;
      await c.query('COMMIT');
      if (p1 !== p2) throw new Error('a transaction keeps its server connection');
      if (r % 7 === 3) {
        await c.query('BEGIN');
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
  console.log(`ok node-postgres ${require('pg/package.json').version}: ${clients} clients, ${clients * rounds} rounds`);
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
