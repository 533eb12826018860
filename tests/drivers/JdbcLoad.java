// pgjdbc through `switchyard proxy` in transaction mode, with server-side prepared statements.
//
// Compiled and run by tests/it/proxy_drivers.rs:
//   java -cp /usr/share/java/postgresql.jar:DIR JdbcLoad JDBC_URL USER PASSWORD FIRST_WORKER WORKERS TRANSACTIONS
// JDBC_URL carries the driver's settings (prepareThreshold, ...). WORKERS threads, numbered
// from FIRST_WORKER, each on a connection of its own, run TRANSACTIONS rounds of a mix of
// statements and check every answer. The tables (events, totals) are made by the Rust test,
// which checks the database contents afterwards. Prints one `jdbc-load ok ...` line, and exits
// 1 (with the failures on stderr) if any check failed.

import java.math.BigDecimal;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Savepoint;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicInteger;

public class JdbcLoad {
    /** One worker at a time runs the query that gets cancelled. */
    static final java.util.concurrent.Semaphore SLEEPERS = new java.util.concurrent.Semaphore(1);

    static final String INSERT =
        "INSERT INTO events (worker, n, kind, amount) VALUES (?, ?, ?, ?)";

    static void check(boolean condition, String what) {
        if (!condition) {
            throw new AssertionError(what);
        }
    }

    static long count(Connection conn, int w, int i, String kind) throws SQLException {
        try (PreparedStatement ps = conn.prepareStatement(
                "SELECT count(*) FROM events WHERE worker = ? AND n = ? AND kind = ?")) {
            ps.setInt(1, w);
            ps.setInt(2, i);
            ps.setString(3, kind);
            try (ResultSet rs = ps.executeQuery()) {
                check(rs.next(), "count: no row");
                return rs.getLong(1);
            }
        }
    }

    static void insert(PreparedStatement ps, int w, int i, String kind, int amount)
            throws SQLException {
        ps.setInt(1, w);
        ps.setInt(2, i);
        ps.setString(3, kind);
        ps.setInt(4, amount);
    }

    static void worker(String url, Properties props, int w, int transactions, AtomicInteger rounds,
            AtomicInteger cancels)
            throws Exception {
        Properties mine = new Properties();
        mine.putAll(props);
        if (w % 2 == 1) {
            // A small statement cache: pgjdbc closes (Close message) the statements it
            // evicts, and prepares them again later under new names.
            mine.setProperty("preparedStatementCacheQueries", "3");
        }
        try (Connection conn = DriverManager.getConnection(url, mine)) {
            // A setting of the session's own, sent as a prepared statement (a named one: the
            // threshold is reached at once), between transactions: it must follow the client to
            // every server connection and reach no other client. The server does not report
            // work_mem with ParameterStatus.
            String workMem = (1000 + 64 * w) + "kB";
            try (PreparedStatement set = conn.prepareStatement("SET work_mem = '" + workMem + "'")) {
                set.execute();
            }
            PreparedStatement setting = conn.prepareStatement(
                "SELECT current_setting('work_mem'), current_setting('transaction_isolation')");
            // Held for the whole run: prepared once by the driver, used on whichever server
            // connection each transaction lands on.
            PreparedStatement types = conn.prepareStatement(
                "SELECT ?::int8 * 2, ?::text || '!', ?::numeric + 0.5, ?::bytea, NOT ?::bool");
            PreparedStatement insert = conn.prepareStatement(INSERT);
            for (int i = 0; i < transactions; i++) {
                // Autocommit: a parameterised SELECT of several types.
                conn.setAutoCommit(true);
                types.setLong(1, 1_000_000_000_000L + i);
                types.setString(2, "w" + w + "-" + i);
                types.setBigDecimal(3, new BigDecimal(i));
                types.setBytes(4, new byte[] {(byte) w, (byte) i, 0, (byte) 0xff});
                types.setBoolean(5, i % 2 == 0);
                try (ResultSet rs = types.executeQuery()) {
                    check(rs.next(), "types: no row");
                    check(rs.getLong(1) == 2 * (1_000_000_000_000L + i), "types int8 " + w + "/" + i);
                    check(rs.getString(2).equals("w" + w + "-" + i + "!"), "types text " + w + "/" + i);
                    check(rs.getBigDecimal(3).compareTo(new BigDecimal(i).add(new BigDecimal("0.5"))) == 0,
                        "types numeric " + w + "/" + i + ": " + rs.getBigDecimal(3));
                    check(Arrays.equals(rs.getBytes(4), new byte[] {(byte) w, (byte) i, 0, (byte) 0xff}),
                        "types bytea " + w + "/" + i);
                    check(rs.getBoolean(5) == (i % 2 != 0), "types bool " + w + "/" + i);
                }
                // Statement texts that change from round to round: with a small cache they
                // keep being prepared and closed.
                try (PreparedStatement ps = conn.prepareStatement("SELECT ?::int4 + " + (i % 5))) {
                    ps.setInt(1, i);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next() && rs.getInt(1) == i + i % 5, "varying " + w + "/" + i);
                    }
                }
                conn.setAutoCommit(i % 2 == 0);
                try (ResultSet rs = setting.executeQuery()) {
                    check(rs.next() && rs.getString(1).equals(workMem),
                        "work_mem " + w + "/" + i + ": " + rs.getString(1));
                    check(rs.getString(2).equals("read committed"),
                        "isolation " + w + "/" + i + ": " + rs.getString(2));
                }
                conn.setAutoCommit(true);
                if (i > 0) {
                    check(types.unwrap(org.postgresql.PGStatement.class).isUseServerPrepare(),
                        "the driver does not use a server-side statement");
                }

                // A transaction: INSERT ... RETURNING, a batch, an UPDATE and a SELECT that
                // sees them; committed.
                conn.setAutoCommit(false);
                try (PreparedStatement ps = conn.prepareStatement(INSERT + " RETURNING id, amount")) {
                    insert(ps, w, i, "insert", i);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next() && rs.getLong(1) > 0 && rs.getInt(2) == i,
                            "returning " + w + "/" + i);
                    }
                }
                for (int k = 0; k < 5; k++) {
                    insert(insert, w, i, "batch", k);
                    insert.addBatch();
                }
                int[] done = insert.executeBatch();
                check(done.length == 5, "batch length " + w + "/" + i + ": " + done.length);
                for (int d : done) {
                    check(d == 1 || d == java.sql.Statement.SUCCESS_NO_INFO,
                        "batch count " + w + "/" + i + ": " + Arrays.toString(done));
                }
                try (PreparedStatement ps = conn.prepareStatement(
                        "UPDATE totals SET n = n + 1, amount = amount + ? WHERE worker = ?")) {
                    ps.setInt(1, i);
                    ps.setInt(2, w);
                    check(ps.executeUpdate() == 1, "update " + w + "/" + i);
                }
                try (PreparedStatement ps = conn.prepareStatement(
                        "SELECT n, amount FROM totals WHERE worker = ?")) {
                    ps.setInt(1, w);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next() && rs.getInt(1) == i + 1
                            && rs.getLong(2) == (long) i * (i + 1) / 2,
                            "totals " + w + "/" + i);
                    }
                }
                check(count(conn, w, i, "batch") == 5, "own batch " + w + "/" + i);
                conn.commit();

                // An error in the middle of a transaction, at execution of a prepared
                // statement: rolled back, and the connection carries on.
                insert(insert, w, i, "doomed", 1);
                insert.executeUpdate();
                try (PreparedStatement ps = conn.prepareStatement("SELECT 1 / ?")) {
                    ps.setInt(1, 0);
                    ps.executeQuery();
                    throw new AssertionError("division by zero passed " + w + "/" + i);
                } catch (SQLException e) {
                    check("22012".equals(e.getSQLState()), "sqlstate " + e.getSQLState() + ": " + e);
                }
                conn.rollback();
                check(count(conn, w, i, "doomed") == 0, "doomed " + w + "/" + i);
                conn.commit();

                // A rollback without an error, and a savepoint rolled back to after an error
                // at Parse; what came before it commits.
                insert(insert, w, i, "rolled_back", 1);
                insert.executeUpdate();
                conn.rollback();
                insert(insert, w, i, "kept", 2);
                insert.executeUpdate();
                Savepoint sp = conn.setSavepoint();
                insert(insert, w, i, "doomed", 1);
                insert.executeUpdate();
                try (PreparedStatement ps = conn.prepareStatement(
                        "SELECT no_such_column FROM totals WHERE worker = ?")) {
                    ps.setInt(1, w);
                    ps.executeQuery();
                    throw new AssertionError("undefined column passed " + w + "/" + i);
                } catch (SQLException e) {
                    check("42703".equals(e.getSQLState()), "sqlstate " + e.getSQLState() + ": " + e);
                }
                conn.rollback(sp);
                conn.commit();
                check(count(conn, w, i, "kept") == 1, "kept " + w + "/" + i);
                check(count(conn, w, i, "rolled_back") == 0, "rolled back " + w + "/" + i);
                conn.commit();

                // A cursor fetched in pieces (a named portal, Execute with a row limit, within
                // the transaction).
                if (i % 10 == 7) {
                    try (PreparedStatement ps = conn.prepareStatement(
                            "SELECT g FROM generate_series(1, ?) AS g")) {
                        ps.setFetchSize(7);
                        ps.setInt(1, 50);
                        long sum = 0;
                        try (ResultSet rs = ps.executeQuery()) {
                            while (rs.next()) {
                                sum += rs.getLong(1);
                            }
                        }
                        check(sum == 1275, "cursor " + w + "/" + i + ": " + sum);
                    }
                    conn.commit();
                }

                // The session's isolation level (pgjdbc sends SET SESSION CHARACTERISTICS):
                // it holds for the client's later transactions, wherever they run.
                if (i == 2) {
                    conn.setAutoCommit(true);
                    conn.setTransactionIsolation(Connection.TRANSACTION_SERIALIZABLE);
                    conn.setAutoCommit(false);
                    for (int k = 0; k < 4; k++) {
                        try (ResultSet rs = setting.executeQuery()) {
                            check(rs.next() && rs.getString(2).equals("serializable"),
                                "serializable " + w + "/" + k + ": " + rs.getString(2));
                            check(rs.getString(1).equals(workMem), "work_mem after isolation");
                        }
                        conn.commit();
                    }
                    conn.setTransactionIsolation(Connection.TRANSACTION_READ_COMMITTED);
                }

                // Statement.cancel from another thread: pgjdbc sends a CancelRequest through
                // the proxy; the connection carries on. pgjdbc sends one CancelRequest per
                // execution, and the proxy drops one that arrives while the query still waits
                // for a server connection: the workers take turns here, so that the other
                // server connection stays free, and the cancel comes a second in.
                if (i == 3) {
                    conn.setAutoCommit(true);
                    SLEEPERS.acquire();
                    try (PreparedStatement ps = conn.prepareStatement("SELECT pg_sleep(?)")) {
                        ps.setInt(1, 20);
                        java.util.concurrent.CountDownLatch finished = new java.util.concurrent.CountDownLatch(1);
                        Thread canceller = new Thread(() -> {
                            try {
                                while (!finished.await(1000, java.util.concurrent.TimeUnit.MILLISECONDS)) {
                                    ps.cancel();
                                }
                            } catch (Exception e) {
                                // The query's own outcome is what is checked.
                            }
                        });
                        canceller.start();
                        long started = System.nanoTime();
                        try {
                            ps.executeQuery();
                            throw new AssertionError("pg_sleep was not cancelled " + w + "/" + i);
                        } catch (SQLException e) {
                            check("57014".equals(e.getSQLState()), "sqlstate " + e.getSQLState() + ": " + e);
                        } finally {
                            finished.countDown();
                            canceller.join();
                        }
                        check(System.nanoTime() - started < 15_000_000_000L, "cancel took too long");
                    } finally {
                        SLEEPERS.release();
                    }
                    cancels.incrementAndGet();
                }
                rounds.incrementAndGet();
            }
            types.close();
            insert.close();
            setting.close();
        }
    }

    public static void main(String[] args) throws Exception {
        String url = args[0];
        Properties props = new Properties();
        props.setProperty("user", args[1]);
        props.setProperty("password", args[2]);
        props.setProperty("connectTimeout", "10");
        // Bounds every wait for the server: a hang fails the run instead of stalling it.
        props.setProperty("socketTimeout", "60");
        int first = Integer.parseInt(args[3]);
        int workers = Integer.parseInt(args[4]);
        int transactions = Integer.parseInt(args[5]);
        AtomicInteger rounds = new AtomicInteger();
        AtomicInteger cancels = new AtomicInteger();
        List<String> failures = java.util.Collections.synchronizedList(new ArrayList<>());
        List<Thread> threads = new ArrayList<>();
        for (int t = 0; t < workers; t++) {
            final int w = first + t;
            Thread thread = new Thread(() -> {
                try {
                    worker(url, props, w, transactions, rounds, cancels);
                } catch (Throwable e) {
                    java.io.StringWriter trace = new java.io.StringWriter();
                    e.printStackTrace(new java.io.PrintWriter(trace));
                    failures.add("worker " + w + ": " + trace);
                }
            });
            threads.add(thread);
            thread.start();
        }
        for (Thread thread : threads) {
            thread.join();
        }
        for (String failure : failures) {
            System.err.println(failure);
        }
        if (!failures.isEmpty()) {
            System.err.println("jdbc-load failed: " + failures.size() + " of " + workers + " workers");
            System.exit(1);
        }
        System.out.println("jdbc-load ok: pgjdbc " + org.postgresql.util.DriverInfo.DRIVER_VERSION
            + " workers=" + workers + " rounds=" + rounds.get() + " cancels=" + cancels.get());
    }
}
