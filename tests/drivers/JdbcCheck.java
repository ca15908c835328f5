// pgjdbc against pgweir in transaction mode: server-prepared statements (prepareThreshold=1: named from the first
// use, then only Bind/Execute), batches, COPY FROM STDIN, a fetch size (a portal read over several Syncs),
// transactions, an error inside a transaction (its insert rolled back), a query timeout (a cancel), per-client
// settings (application_name, search_path); clients in threads. With PGWEIR_CHECK_MAX_PREPARED=N, no server
// connection ever holds more than N named statements.
//
// usage: java -cp postgresql.jar:. JdbcCheck HOST PORT USER PASSWORD DATABASE CLIENTS ROUNDS
// prints 'ok ... servers=N' (N: server connections seen) or fails (exit 1).
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;

public class JdbcCheck {
    static final Set<Integer> pids = ConcurrentHashMap.newKeySet();
    static final int maxPrepared = Integer.parseInt(System.getenv().getOrDefault("PGWEIR_CHECK_MAX_PREPARED", "0"));

    static void check(boolean ok, String what) {
        if (!ok) throw new AssertionError(what);
    }

    static void client(int i, String[] a, int rounds) throws Exception {
        String url = "jdbc:postgresql://" + a[0] + ":" + a[1] + "/" + a[4]
            + "?sslmode=disable&prepareThreshold=1&ApplicationName=jdbc-" + i;
        try (Connection c = DriverManager.getConnection(url, a[2], a[3])) {
            c.setAutoCommit(true);
            // Schema s<i> has a table `who` that holds i: an unqualified name resolves through this client's path.
            try (Statement st = c.createStatement()) {
                st.execute("SET search_path TO s" + i + ", public");
            }
            try (PreparedStatement own = c.prepareStatement(
                    "SELECT ?::int * 1000 + ?::int, current_setting('application_name')");
                 PreparedStatement pid = c.prepareStatement("SELECT pg_backend_pid()");
                 PreparedStatement ins = c.prepareStatement(
                    "INSERT INTO drv_items(driver, client, n) VALUES ('jdbc', ?, ?)");
                 PreparedStatement div = c.prepareStatement("SELECT 1 / ?::int");
                 PreparedStatement who = c.prepareStatement("SELECT v FROM who")) {
                for (int r = 0; r < rounds; r++) {
                    own.setInt(1, i);
                    own.setInt(2, r);
                    try (ResultSet rs = own.executeQuery()) {
                        check(rs.next(), "a row");
                        check(rs.getInt(1) == i * 1000 + r, "client " + i + " round " + r + ": got " + rs.getInt(1));
                        check(rs.getString(2).equals("jdbc-" + i), "client " + i + ": application_name " + rs.getString(2));
                    }
                    // Same name (S_n) and text in every client, resolved through each client's search_path.
                    try (ResultSet rs = who.executeQuery()) {
                        check(rs.next() && rs.getInt(1) == i, "client " + i + ": another client's schema");
                    }
                    if (maxPrepared > 0) {
                        // Not prepared (unnamed): not counted itself, and no eviction before it.
                        try (Statement st = c.createStatement()) {
                            st.unwrap(org.postgresql.PGStatement.class).setPrepareThreshold(0);
                            ResultSet rs = st.executeQuery("SELECT count(*) FROM pg_prepared_statements");
                            rs.next();
                            check(rs.getInt(1) <= maxPrepared, "a server connection holds " + rs.getInt(1) + " named statements");
                        }
                    }
                    c.setAutoCommit(false);
                    int p1, p2;
                    try (ResultSet rs = pid.executeQuery()) { rs.next(); p1 = rs.getInt(1); }
                    ins.setInt(1, i);
                    ins.setInt(2, r);
                    ins.executeUpdate();
                    try (ResultSet rs = pid.executeQuery()) { rs.next(); p2 = rs.getInt(1); }
                    c.commit();
                    check(p1 == p2, "a transaction keeps its server connection");
                    pids.add(p1);
                    if (r == 5) {
                        // A query timeout: pgjdbc cancels the query; the cancel must reach this client's query only
                        // (and at once: not after the 30 s sleep).
                        long started = System.nanoTime();
                        try (Statement slow = c.createStatement()) {
                            slow.setQueryTimeout(1);
                            slow.executeQuery("SELECT pg_sleep(30)").close();
                            throw new AssertionError("pg_sleep(30) was not cancelled");
                        } catch (SQLException e) {
                            check("57014".equals(e.getSQLState()), "sqlstate " + e.getSQLState());
                        }
                        c.rollback();
                        double took = (System.nanoTime() - started) / 1e9;
                        check(took < 10, "client " + i + ": the cancel took " + took + " s");
                    }
                    if (r % 7 == 3) {
                        ins.setInt(1, i);
                        ins.setInt(2, -1);
                        ins.executeUpdate();
                        div.setInt(1, 0);
                        try {
                            div.executeQuery().close();
                            throw new AssertionError("division by zero succeeded");
                        } catch (SQLException e) {
                            check("22012".equals(e.getSQLState()), "sqlstate " + e.getSQLState());
                        }
                        c.rollback();
                    }
                    c.setAutoCommit(true);
                }
                // A batch: many Bind/Execute of one statement, one Sync.
                for (int k = 0; k < 20; k++) {
                    ins.setInt(1, i);
                    ins.setInt(2, 10000 + k);
                    ins.addBatch();
                }
                int[] counts = ins.executeBatch();
                check(counts.length == 20, "batch of 20");
            }
            // COPY FROM STDIN.
            StringBuilder rows = new StringBuilder();
            for (int k = 0; k < 10; k++) rows.append("jdbc\t").append(i).append('\t').append(20000 + k).append('\n');
            long copied = new org.postgresql.copy.CopyManager((org.postgresql.core.BaseConnection) c)
                .copyIn("COPY public.drv_items (driver, client, n) FROM STDIN", new java.io.StringReader(rows.toString()));
            check(copied == 10, "copied " + copied);
            // A fetch size in a transaction: the rows come a few at a time from a named portal (Execute with a row
            // limit, then PortalSuspended), over several Syncs.
            c.setAutoCommit(false);
            try (PreparedStatement series = c.prepareStatement("SELECT n FROM generate_series(1, 50) n WHERE n > ?")) {
                series.setFetchSize(7);
                series.setInt(1, 0);
                int expect = 1;
                try (ResultSet rs = series.executeQuery()) {
                    while (rs.next()) {
                        check(rs.getInt(1) == expect, "row " + rs.getInt(1) + ", expected " + expect);
                        expect++;
                    }
                }
                check(expect == 51, "50 rows, got " + (expect - 1));
            }
            c.commit();
            c.setAutoCommit(true);
            try (PreparedStatement n = c.prepareStatement(
                    "SELECT count(*) FROM drv_items WHERE driver = 'jdbc' AND client = ?")) {
                n.setInt(1, i);
                try (ResultSet rs = n.executeQuery()) {
                    rs.next();
                    check(rs.getInt(1) == rounds + 30, "client " + i + ": " + rs.getInt(1) + " rows");
                }
            }
        }
    }

    public static void main(String[] a) throws Exception {
        int clients = Integer.parseInt(a[5]);
        int rounds = Integer.parseInt(a[6]);
        ExecutorService pool = Executors.newFixedThreadPool(clients);
        List<Future<?>> all = new ArrayList<>();
        for (int i = 0; i < clients; i++) {
            final int id = i;
            all.add(pool.submit(() -> { client(id, a, rounds); return null; }));
        }
        int failed = 0;
        for (Future<?> f : all) {
            try {
                f.get();
            } catch (ExecutionException e) {
                e.getCause().printStackTrace();
                failed++;
            }
        }
        pool.shutdown();
        if (failed > 0) System.exit(1);
        System.out.println("ok pgjdbc " + org.postgresql.util.DriverInfo.DRIVER_VERSION + ": " + clients
            + " clients, " + clients * rounds + " rounds, servers=" + pids.size());
    }
}
