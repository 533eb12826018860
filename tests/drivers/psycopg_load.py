"""psycopg 3 through `switchyard proxy` in transaction mode, every statement server-side prepared.

Run by tests/it/proxy_drivers.rs as `python3 psycopg_load.py URL WORKERS TRANSACTIONS`: WORKERS
threads, each on a connection of its own, run TRANSACTIONS rounds of a mix of statements and
check every answer. The tables (events, totals, copied) are made by the Rust test, which checks
the database contents afterwards. Prints one `psycopg-load ok ...` line with what was done, and
exits non-zero (with the tracebacks on stderr) if any check failed.
"""

import sys
import threading
import traceback

import psycopg
from psycopg import errors, sql

URL, WORKERS, TRANSACTIONS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

INSERT = "INSERT INTO events (worker, n, kind, amount) VALUES (%s, %s, %s, %s)"


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def worker(w, failures, counts):
    # Odd workers keep few prepared statements: psycopg then deallocates the oldest as it
    # prepares new ones, and the proxy must follow. Odd workers are also not in autocommit:
    # psycopg opens the transactions itself and the script commits or rolls back.
    autocommit = w % 2 == 0
    with psycopg.connect(
        URL, prepare_threshold=0, autocommit=autocommit, connect_timeout=10
    ) as conn:
        if w % 2 == 1:
            conn.prepared_max = 4

        def done():
            if not autocommit:
                conn.commit()

        # A setting of the session's own, sent as a prepared statement (prepare_threshold=0
        # prepares it too): it must follow the client to every server connection, and reach
        # no other client. work_mem is not one the server reports with ParameterStatus.
        work_mem = f"{1000 + 64 * w}kB"
        conn.execute(f"SET work_mem = '{work_mem}'")
        done()

        for i in range(TRANSACTIONS):
            # A parameterised SELECT; the text varies, so that statements keep being prepared
            # (and, with prepared_max = 4, deallocated).
            row = conn.execute(
                f"SELECT %s::int4 * 2 + {i % 7}, %s::text || '-' || %s::text, "
                "current_setting('work_mem')",
                (i, f"w{w}", str(i)),
            ).fetchone()
            check(
                row == (i * 2 + i % 7, f"w{w}-{i}", work_mem), f"select {w}/{i}: {row!r}"
            )
            done()

            # INSERT ... RETURNING.
            with conn.transaction():
                new_id, amount = conn.execute(
                    INSERT + " RETURNING id, amount", (w, i, "insert", i)
                ).fetchone()
                check(amount == i and new_id > 0, f"returning {w}/{i}: {new_id} {amount}")

            # An explicit transaction of several statements, which see each other's writes.
            with conn.transaction():
                conn.execute(INSERT, (w, i, "multi", 1))
                conn.execute(
                    "UPDATE totals SET n = n + 1, amount = amount + %s WHERE worker = %s",
                    (i, w),
                )
                n, total = conn.execute(
                    "SELECT n, amount FROM totals WHERE worker = %s", (w,)
                ).fetchone()
                check(
                    (n, total) == (i + 1, i * (i + 1) // 2),
                    f"totals {w}/{i}: {n} {total}",
                )
                (mine,) = conn.execute(
                    "SELECT count(*) FROM events WHERE worker = %s AND n = %s AND kind = 'multi'",
                    (w, i),
                ).fetchone()
                check(mine == 1, f"own write {w}/{i}: {mine}")

            # An error in the middle of a transaction (at execution, of a statement that was
            # prepared): the transaction is rolled back, its write with it, and the session
            # carries on.
            try:
                with conn.transaction():
                    conn.execute(INSERT, (w, i, "doomed", 1))
                    conn.execute("SELECT 1 / %s::int4", (0,))
                raise AssertionError(f"division by zero passed {w}/{i}")
            except errors.DivisionByZero:
                pass
            (doomed,) = conn.execute(
                "SELECT count(*) FROM events WHERE worker = %s AND kind = 'doomed'", (w,)
            ).fetchone()
            check(doomed == 0, f"doomed rows {w}/{i}: {doomed}")
            done()

            # An error at Parse inside a savepoint: the statement never got prepared, the
            # outer transaction goes on and commits.
            with conn.transaction():
                conn.execute(INSERT, (w, i, "kept", 2))
                try:
                    with conn.transaction():
                        conn.execute(INSERT, (w, i, "doomed", 1))
                        conn.execute("SELECT no_such_column FROM totals WHERE worker = %s", (w,))
                    raise AssertionError(f"undefined column passed {w}/{i}")
                except errors.UndefinedColumn:
                    pass
                (kept,) = conn.execute(
                    "SELECT count(*) FROM events WHERE worker = %s AND n = %s AND kind = 'kept'",
                    (w, i),
                ).fetchone()
                check(kept == 1, f"kept {w}/{i}: {kept}")

            # executemany (psycopg pipelines it), with and without RETURNING.
            with conn.transaction():
                with conn.cursor() as cur:
                    cur.executemany(INSERT, [(w, i, "many", k) for k in range(5)])
                    check(cur.rowcount == 5, f"executemany rowcount {w}/{i}: {cur.rowcount}")
                    cur.executemany(
                        INSERT + " RETURNING amount",
                        [(w, i, "many_ret", k) for k in range(3)],
                        returning=True,
                    )
                    got = []
                    while True:
                        got.append(cur.fetchone()[0])
                        if not cur.nextset():
                            break
                    check(got == [0, 1, 2], f"executemany returning {w}/{i}: {got}")

            # A pipeline of its own: several statements, one Sync.
            with conn.pipeline():
                a = conn.execute("SELECT %s::int8 + 1", (i,))
                b = conn.execute(
                    "SELECT count(*) FROM events WHERE worker = %s AND n = %s", (w, i)
                )
            check(a.fetchone()[0] == i + 1, f"pipeline a {w}/{i}")
            # insert, multi, kept, 5 many, 3 many_ret.
            check(b.fetchone()[0] == 11, f"pipeline b {w}/{i}")
            done()

            # A ROLLBACK run as a statement makes psycopg forget its prepared statements and
            # send DEALLOCATE ALL before the next query.
            if i % 10 == 5:
                if autocommit:
                    conn.execute("BEGIN")
                conn.execute(INSERT, (w, i, "doomed", 1))
                conn.execute("ROLLBACK")
                (doomed,) = conn.execute(
                    "SELECT count(*) FROM events WHERE worker = %s AND kind = 'doomed'", (w,)
                ).fetchone()
                check(doomed == 0, f"rolled back by statement {w}/{i}: {doomed}")
                done()

            # A server-side cursor (DECLARE and FETCH in a transaction), fetched in pieces.
            if i % 10 == 7:
                with conn.transaction():
                    with conn.cursor(name=f"c_{w}_{i}") as cur:
                        cur.itersize = 7
                        cur.execute("SELECT g FROM generate_series(1, %s) AS g", (50,))
                        check(sum(r[0] for r in cur) == 1275, f"named cursor {w}/{i}")

            # A query cancelled from another thread (conn.cancel_safe sends a CancelRequest
            # through the proxy); the session carries on. Sent every half second until the
            # query ends: one sent while the query still waits for a server connection has
            # nothing to cancel yet.
            if i == 3:
                finished = threading.Event()

                def cancel():
                    while not finished.wait(0.5):
                        conn.cancel_safe(timeout=5)

                canceller = threading.Thread(target=cancel)
                canceller.start()
                try:
                    conn.execute("SELECT pg_sleep(%s)", (20,))
                    raise AssertionError(f"pg_sleep was not cancelled {w}/{i}")
                except errors.QueryCanceled:
                    pass
                finally:
                    finished.set()
                    canceller.join()
                conn.rollback()
                counts["cancels"] += 1

            # COPY both ways, now and then.
            if i % 10 == 0:
                payloads = [f"w{w} i{i} k{k}\ttab \\ backslash" for k in range(20)]
                with conn.transaction():
                    with conn.cursor() as cur:
                        with cur.copy("COPY copied (worker, n, payload) FROM STDIN") as copy:
                            for p in payloads:
                                copy.write_row((w, i, p))
                        query = sql.SQL(
                            "COPY (SELECT payload FROM copied WHERE worker = {} AND n = {} "
                            "ORDER BY payload) TO STDOUT"
                        ).format(w, i)
                        with cur.copy(query) as copy:
                            back = [row[0] for row in copy.rows()]
                check(back == sorted(payloads), f"copy {w}/{i}: {back[:2]!r}")
                counts["copies"] += 1
            counts["rounds"] += 1


def main():
    failures = []
    counts = {"rounds": 0, "copies": 0, "cancels": 0}
    lock = threading.Lock()

    def run(w):
        mine = {"rounds": 0, "copies": 0, "cancels": 0}
        try:
            worker(w, failures, mine)
        except BaseException:
            failures.append(f"worker {w}:\n{traceback.format_exc()}")
        with lock:
            for k, v in mine.items():
                counts[k] += v

    threads = [threading.Thread(target=run, args=(w,)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for failure in failures:
        print(failure, file=sys.stderr)
    if failures:
        print(f"psycopg-load failed: {len(failures)} of {WORKERS} workers", file=sys.stderr)
        return 1
    print(
        f"psycopg-load ok: psycopg {psycopg.__version__} ({psycopg.pq.__impl__}, libpq "
        f"{psycopg.pq.version()}) workers={WORKERS} rounds={counts['rounds']} "
        f"copies={counts['copies']} cancels={counts['cancels']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
