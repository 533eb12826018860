//! A differential, protocol-aware fuzzer for `switchyard proxy`.
//!
//! Seeded random sequences of well-formed frontend messages go over raw sockets: simple
//! queries (one statement or several), the extended protocol with named and unnamed
//! statements and portals (Describe, row limits and PortalSuspended, Close), Flush (whose
//! answers are awaited), errors of every stage, transactions and savepoints, SET and RESET,
//! COPY FROM STDIN in both protocols pipelined with what follows it, COPY TO STDOUT,
//! Terminate and abrupt closes in the middle of a transaction, all in writes split at
//! arbitrary bytes. Every result carries a token naming its client and step (`~c3-s17~`;
//! rows stored in a table carry `#c3-s17#`), so a client recognises answers that are not its.
//!
//! - Isolation runs: eight clients at once, first directly against PostgreSQL (which checks
//!   the fuzzer itself: PostgreSQL must never trip the checks), then through a
//!   transaction-mode proxy with a pool of two and through a session-mode proxy. Each client
//!   checks that every Sync and Query gets its one ReadyForQuery (none for a Sync sent in
//!   copy-in mode, which PostgreSQL ignores), that no answer carries another client's token,
//!   and that nothing hangs; afterwards the test checks that no abandoned transaction was
//!   committed and that no server connection was left inside a transaction.
//! - A differential run: each session once directly and once through a proxy (both modes in
//!   turn), one at a time, each from the same table contents; the answers must be the
//!   same, message by message (ParameterStatus, BackendKeyData and notices aside; errors by
//!   SQLSTATE), but for the limits the README documents ([`allowed_difference`]). A proxy
//!   that failed a session is restarted, so that a pool it broke is not blamed on the next.
//!
//! Failures are grouped by what they have in common (their signature: for a difference,
//! the two first messages that differ) and one example of each is printed: the session's
//! messages up to the write it failed after, for a cross-client answer also the other
//! client's session, and, within a time budget, the session shrunk to what still shows
//! the difference (through a fresh proxy each try). The fuzzer runs its own PostgreSQL, as
//! a crashed backend restarts every backend of the cluster; crashes are failures too.
//!
//! `SWITCHYARD_FUZZ_SEED` replays a run (the seed is printed at the start and with every
//! failure); `SWITCHYARD_FUZZ_SECS` sets its length (default 60, bench/fuzz.sh runs
//! longer); `SWITCHYARD_FUZZ_REPLAY=<phase>:<client>:<session>:<step>`, as printed with a
//! failure, runs that one session directly and through a fresh proxy and prints both
//! answers (a failure that needs other clients at the same time may not show alone).
//!
//! What it does not do: send malformed messages (only well-formed sequences), cancel
//! requests, TLS, LISTEN/NOTIFY, server-connection state the README says a pooler cannot
//! carry, or Execute/Describe of the unnamed portal without a Bind of it in the same group
//! (a PostgreSQL bug: [`avoids_unnamed_portal_crash`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use postgres_protocol::IsNull;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::servers::{Cluster, Flavor};
use crate::common::TestDb;
use crate::proxy::Proxy;

/// Clients of an isolation run, and tables (`fz_c0` ...), one per client.
const CLIENTS: usize = 8;
/// A read that waits longer than this is a hang.
const HANG: Duration = Duration::from_secs(10);
/// Sessions per client and phase, whatever the time: the run is bounded in count too.
const MAX_SESSIONS: u64 = 100_000;
/// Distinct signatures kept per kind of failure (each with one example); the rest are
/// counted together.
const SIGNATURES: usize = 12;
/// Rows a reset table starts with (ids 1 to this).
const INITIAL_ROWS: i32 = 6;
/// The application_name of every session, direct or through a proxy, for whoever looks at
/// pg_stat_activity.
const APPLICATION: &str = "switchyard-fuzz";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_fuzz_isolation_and_differential() {
    let config = Config::from_env();
    eprintln!(
        "proxy_fuzz: seed {} for {} s; SWITCHYARD_FUZZ_SEED={} replays it",
        config.seed, config.secs, config.seed
    );
    let mut lab = Lab::new().await;
    if let Some(spec) = &config.replay {
        replay(spec, &config, &mut lab).await;
        return;
    }

    let report = Arc::new(Mutex::new(Report::default()));
    // Each phase's share of the run counts from the phase's own start: one that overran
    // (by a hang, HANG at most) does not eat the next. The direct run checks the fuzzer;
    // the proxies get most of the time.
    let share = |part: f64| Instant::now() + Duration::from_secs_f64(config.secs * part);
    let plan = [
        (Phase::Direct, 0.10),
        (Phase::Transaction, 0.35),
        (Phase::Session, 0.15),
    ];
    for (phase, part) in plan {
        let until = share(part);
        let target = match phase {
            Phase::Direct => lab.targets.direct.clone(),
            Phase::Session => lab.targets.session.clone(),
            _ => lab.targets.transaction.clone(),
        };
        let mut problems = Vec::new();
        for client in 0..CLIENTS {
            if let Err(e) = reset(&lab.admin, client).await {
                problems.push(Problem::new(
                    Kind::Leaked,
                    "a transaction still open when the next session starts",
                    e,
                ));
            }
        }
        lab.cache_caught_up().await;
        isolation(phase, &target, &config, until, &report).await;
        // The clients are gone: their server connections settle, and what they abandoned
        // mid-transaction must not have been committed.
        problems.extend(lab.crashes.problems(target.name));
        if let Err(e) = settle(&lab.admin, &target.user).await {
            problems.push(Problem::new(
                Kind::Leaked,
                "a backend still busy after the clients left",
                e,
            ));
        }
        for client in 0..CLIENTS {
            let committed = abandoned_rows(&lab.admin, client).await;
            if committed > 0 {
                problems.push(Problem::new(
                    Kind::Committed,
                    "rows of an abandoned transaction committed",
                    format!(
                        "{committed} rows of {} were inserted by transactions whose client \
                         left, and are committed",
                        table(client)
                    ),
                ));
            }
        }
        lock(&report).phase_problems(phase, problems);
        // What a run did to a proxy's pool (a connection left in a transaction holds its
        // locks) is not the next run's.
        match phase {
            Phase::Transaction => lab.restart("transaction").await,
            Phase::Session => lab.restart("session").await,
            _ => {}
        }
    }
    differential(&config, &mut lab, share(0.40), &report).await;
    shrink_examples(
        &config,
        &mut lab,
        share(0.25_f64.max(10.0 / config.secs.max(1.0))),
        &report,
    )
    .await;

    if lab.cache.is_some() {
        for proxy in [&lab.transaction, &lab.session] {
            let (_, body) = proxy.admin("GET", "/cache", None, "").await;
            let cache: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            eprintln!(
                "read cache of the {} proxy: {} hits, {} misses, {} stored, bypassed {}",
                proxy.plan.display(),
                cache["hits"],
                cache["misses"],
                cache["stored"],
                cache["bypassed"]
            );
        }
    }
    let report = lock(&report);
    eprintln!("{}", report.summary(&config));
    let failures: u64 = report.counts.values().sum();
    assert!(
        failures == 0,
        "proxy_fuzz found {failures} failures (seed {}; details above; \
         SWITCHYARD_FUZZ_SEED={} replays the run)",
        config.seed,
        config.seed
    );
}

/// What the runs need: PostgreSQL, the proxies in front of it, and a way to look.
struct Lab {
    admin: Admin,
    crashes: CrashWatch,
    targets: Targets,
    transaction: Proxy,
    session: Proxy,
    /// `SWITCHYARD_FUZZ_CACHE`: both proxies answer reads from a Redis read cache, and every
    /// reset of a table waits until the cache has processed it (a cached answer may be up to
    /// `max_staleness` old for writes made outside the proxy: the admin's resets).
    cache: Option<crate::common::redis::Redis>,
    // Kept for its plan files, which the proxies read when restarted.
    _db: TestDb,
}

impl Lab {
    async fn new() -> Lab {
        // A PostgreSQL of its own: what a desynchronised proxy sends can crash a backend,
        // which restarts every backend of the cluster, and that must not fail other tests.
        let source: &'static Cluster = Box::leak(Box::new(Cluster::start(Flavor::Source15)));
        let db = TestDb::on("proxy_fuzz", source, crate::common::target()).await;
        let admin = Admin::new(source.url(&db.name));
        let crashes = CrashWatch::new(source);
        for client in 0..CLIENTS {
            admin
                .execute(&format!(
                    "CREATE TABLE {} (id int PRIMARY KEY, note text)",
                    table(client)
                ))
                .await
                .expect("create a client's table");
        }
        // Pools smaller than the clients, so that server connections are shared; two
        // workers, each with its share, whatever the machine has.
        let cache =
            std::env::var_os("SWITCHYARD_FUZZ_CACHE").map(|_| crate::common::redis::Redis::start());
        let extra = match &cache {
            Some(redis) => format!(
                "workers = 2\n[proxy.cache]\nredis_url = \"{}\"\nreplication_user = \"proxy_fuzz_cache\"\n\
                 replication_password_env = \"TEST_APP_PASSWORD\"\n",
                redis.url()
            ),
            None => "workers = 2".to_string(),
        };
        // `SWITCHYARD_FUZZ_SHADOW`: both proxies also capture every eligible read's answer for
        // a shadow replay (on the target, where the fuzz tables do not exist: the replays
        // fail or differ, which the clients must never see).
        let extra = match std::env::var_os("SWITCHYARD_FUZZ_SHADOW") {
            Some(_) => format!("{extra}\n[proxy.shadow]\nfraction = 1.0\n"),
            None => extra,
        };
        let transaction = Proxy::start(&db, "transaction", 2, &extra).await;
        let session = Proxy::start(&db, "session", 4, &extra).await;
        if cache.is_some() {
            let output = db
                .command(&["cache", "setup"])
                .arg(&transaction.plan)
                .env("TEST_APP_PASSWORD", &transaction.password)
                .output()
                .expect("run switchyard cache setup");
            assert!(output.status.success(), "{}", crate::common::text(&output));
        }
        let target = |name: &'static str, port: u16| Target {
            name,
            port,
            user: transaction.user.clone(),
            password: transaction.password.clone(),
            database: db.name.clone(),
        };
        let targets = Targets {
            direct: target("directly", source.port),
            transaction: target("through the transaction-mode proxy", transaction.port),
            session: target("through the session-mode proxy", session.port),
        };
        Lab {
            admin,
            crashes,
            targets,
            transaction,
            session,
            cache,
            _db: db,
        }
    }

    /// With the cache: waits until it has processed everything written so far (up to 5 s).
    async fn cache_caught_up(&self) {
        if self.cache.is_none() {
            return;
        }
        let Ok(row) = self
            .admin
            .client()
            .await
            .query_one(
                "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8",
                &[],
            )
            .await
        else {
            return;
        };
        let wanted = row.get::<_, i64>(0) as u64;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            for proxy in [&self.transaction, &self.session] {
                let (_, body) = proxy.admin("GET", "/cache", None, "").await;
                let processed = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|r| r["invalidator"]["processed"].as_u64())
                    .unwrap_or(0);
                if processed >= wanted {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A proxy started again, with a new pool (on the same port).
    async fn restart(&mut self, mode: &str) {
        if mode == "session" {
            self.session.restart().await;
        } else {
            self.transaction.restart().await;
        }
    }

    /// Runs a script directly, then through the proxy of `mode`, each from a freshly reset
    /// table; gives both runs and the problems of both: the direct run's are the fuzzer's
    /// errors (unless PostgreSQL crashed meanwhile), and a difference between the two is
    /// one too.
    async fn both_ways(
        &mut self,
        script: &Script,
        mode: &str,
        hang: Duration,
    ) -> (Run, Run, Vec<Problem>) {
        let client = script.id.client;
        let direct = self.targets.direct.clone();
        let proxied = self.targets.proxy(mode).clone();
        let mut problems = Vec::new();
        let mut runs = Vec::new();
        for (side, target) in [&direct, &proxied].into_iter().enumerate() {
            if let Err(e) = reset(&self.admin, client).await {
                problems.push(Problem::new(
                    Kind::Leaked,
                    "a transaction still open when the next session starts",
                    format!("before the run {}: {e}", target.name),
                ));
            }
            self.cache_caught_up().await;
            // A crash after the run before is not this run's.
            self.crashes.new_crashes();
            let mut run = run_session(target, script, hang).await;
            if let Err(e) = settle(&self.admin, &target.user).await {
                run.problems.push(Problem::new(
                    Kind::Leaked,
                    "a backend still busy after its client left",
                    format!("after the run {}: {e}", target.name),
                ));
            }
            let committed = abandoned_rows(&self.admin, client).await;
            if committed > 0 {
                run.problems.push(Problem::new(
                    Kind::Committed,
                    "rows of an abandoned transaction committed",
                    format!(
                        "{}: {committed} rows of the abandoned transaction are committed",
                        target.name
                    ),
                ));
            }
            let crashed = self.crashes.problems(target.name);
            if side == 0 && crashed.is_empty() {
                for mut problem in run.problems.drain(..) {
                    problem.signature = format!("{:?}: {}", problem.kind, problem.signature);
                    problem.kind = Kind::Fuzzer;
                    problems.push(problem);
                }
            }
            problems.extend(crashed);
            problems.append(&mut run.problems);
            runs.push(run);
        }
        let mut through = runs.pop().expect("two runs");
        let direct_run = runs.pop().expect("two runs");
        if let Some(difference) = first_difference(script, mode, &direct_run, &mut through) {
            problems.push(Problem {
                kind: Kind::Difference,
                signature: difference.signature,
                detail: format!("{}: {}", proxied.name, difference.text),
                at_write: difference.write,
                foreign: None,
            });
        }
        (direct_run, through, problems)
    }
}

/// The coordinator's connection to the fuzzer's PostgreSQL, opened again when a backend
/// crash (which ends every connection while the cluster recovers) closed it.
struct Admin {
    url: String,
    client: tokio::sync::Mutex<Option<Arc<tokio_postgres::Client>>>,
}

impl Admin {
    fn new(url: String) -> Admin {
        Admin {
            url,
            client: tokio::sync::Mutex::new(None),
        }
    }

    async fn client(&self) -> Arc<tokio_postgres::Client> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return client.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    let client = Arc::new(client);
                    *slot = Some(client.clone());
                    return client;
                }
                // In recovery after a crash (57P03) for a moment.
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("the fuzzer's PostgreSQL did not come back: {e}"),
            }
        }
    }

    /// A batch, again on a new connection if a crash closed the one it went on.
    async fn execute(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        let mut tries = 0;
        loop {
            let client = self.client().await;
            match client.batch_execute(sql).await {
                Err(_) if client.is_closed() && tries < 3 => tries += 1,
                result => return result,
            }
        }
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let mut tries = 0;
        loop {
            let client = self.client().await;
            match client.query(sql, params).await {
                Err(_) if client.is_closed() && tries < 3 => tries += 1,
                result => return result,
            }
        }
    }
}

/// Follows the postmaster's log for backends that crashed.
struct CrashWatch {
    dir: std::path::PathBuf,
    read: HashMap<std::path::PathBuf, usize>,
}

impl CrashWatch {
    fn new(cluster: &Cluster) -> CrashWatch {
        let mut watch = CrashWatch {
            dir: cluster.dir.join("data").join("log"),
            read: HashMap::new(),
        };
        watch.new_crashes();
        watch
    }

    /// The log lines about crashed backends written since the last call.
    fn new_crashes(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return lines;
        };
        for entry in entries.flatten() {
            let from = self.read.entry(entry.path()).or_default();
            let Ok(mut file) = std::fs::File::open(entry.path()) else {
                continue;
            };
            let mut text = Vec::new();
            if file.seek(SeekFrom::Start(*from as u64)).is_err()
                || file.read_to_end(&mut text).is_err()
            {
                continue;
            }
            *from += text.len();
            lines.extend(
                String::from_utf8_lossy(&text)
                    .lines()
                    .filter(|line| line.contains("terminated by signal"))
                    .map(str::to_string),
            );
        }
        lines
    }

    fn problems(&mut self, during: &str) -> Vec<Problem> {
        self.new_crashes()
            .into_iter()
            .map(|line| {
                Problem::new(
                    Kind::ServerCrash,
                    "a backend crashed",
                    format!("a PostgreSQL backend crashed while running {during}: {line}"),
                )
            })
            .collect()
    }
}

/// The seed of the suite's run (`SWITCHYARD_FUZZ_SEED` overrides it).
const DEFAULT_SEED: u64 = 2024;

struct Config {
    seed: u64,
    secs: f64,
    replay: Option<String>,
    /// The pool modes the differential phase compares (`SWITCHYARD_FUZZ_DIFFERENTIAL`, a
    /// comma-separated list). Session mode by default: in transaction mode a session's
    /// state that depends on messages the server skipped after an error (an unnamed
    /// statement, a SET among them) is still not always carried exactly from one server
    /// connection to the next, and the suite must not fail on what is known and open;
    /// bench/fuzz.sh compares both.
    differential_modes: Vec<String>,
}

impl Config {
    fn from_env() -> Config {
        let seed = match std::env::var("SWITCHYARD_FUZZ_SEED") {
            Ok(text) => text
                .trim()
                .parse()
                .expect("SWITCHYARD_FUZZ_SEED is an unsigned 64-bit number"),
            // The suite runs fixed sequences, so that a failure in CI is one run to replay;
            // bench/fuzz.sh picks a new seed each run.
            Err(_) => DEFAULT_SEED,
        };
        let differential_modes = std::env::var("SWITCHYARD_FUZZ_DIFFERENTIAL")
            .unwrap_or_else(|_| "session".to_string())
            .split(',')
            .map(|mode| mode.trim().to_string())
            .filter(|mode| !mode.is_empty())
            .collect();
        let secs = match std::env::var("SWITCHYARD_FUZZ_SECS") {
            Ok(text) => text
                .trim()
                .parse()
                .expect("SWITCHYARD_FUZZ_SECS is a number of seconds"),
            Err(_) => 60.0,
        };
        Config {
            seed,
            secs,
            replay: std::env::var("SWITCHYARD_FUZZ_REPLAY").ok(),
            differential_modes,
        }
    }
}

fn table(client: usize) -> String {
    format!("fz_c{client}")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A client task that panicked has been reported by its join; its data is still good.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// Phases and sessions

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Phase {
    Direct,
    Transaction,
    Session,
    Differential,
}

impl Phase {
    const ALL: [Phase; 4] = [
        Phase::Direct,
        Phase::Transaction,
        Phase::Session,
        Phase::Differential,
    ];

    fn name(self) -> &'static str {
        match self {
            Phase::Direct => "direct",
            Phase::Transaction => "transaction",
            Phase::Session => "session",
            Phase::Differential => "differential",
        }
    }
}

/// Names a session's script: with the run's seed, it generates the same messages again.
#[derive(Clone, Copy, Debug)]
struct SessionId {
    phase: Phase,
    client: usize,
    session: u64,
    /// The client's first token step in this session (steps go on from session to session).
    start_step: u64,
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}",
            self.phase.name(),
            self.client,
            self.session,
            self.start_step
        )
    }
}

impl SessionId {
    fn parse(spec: &str) -> Option<SessionId> {
        let mut parts = spec.trim().split(':');
        let phase = parts.next()?;
        let phase = Phase::ALL.into_iter().find(|p| p.name() == phase)?;
        let client: usize = parts.next()?.parse().ok()?;
        let session = parts.next()?.parse().ok()?;
        let start_step = parts.next()?.parse().ok()?;
        (client < CLIENTS).then_some(SessionId {
            phase,
            client,
            session,
            start_step,
        })
    }

    fn seed(&self, seed: u64) -> u64 {
        // splitmix64 over the run's seed and the session's coordinates.
        let mut x = seed
            ^ (self.phase as u64) << 56
            ^ (self.client as u64) << 48
            ^ self.session.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    /// The proxy a differential session goes through: both modes take turns.
    fn differential_mode(&self) -> &'static str {
        if self.session % 3 == 2 {
            "session"
        } else {
            "transaction"
        }
    }

    /// The proxy mode the session ran in (the transaction mode for a direct one).
    fn proxy_mode(&self) -> &'static str {
        match self.phase {
            Phase::Session => "session",
            Phase::Differential => self.differential_mode(),
            _ => "transaction",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Frontend messages

#[derive(Clone)]
enum Msg {
    Query(String),
    Parse {
        name: String,
        query: String,
        types: Vec<u32>,
    },
    Bind {
        portal: String,
        statement: String,
        params: Vec<Option<String>>,
        binary: bool,
    },
    Describe {
        kind: u8,
        name: String,
    },
    Execute {
        portal: String,
        max_rows: i32,
    },
    Close {
        kind: u8,
        name: String,
    },
    Sync,
    Flush,
    CopyData(String),
    CopyDone,
    CopyFail(String),
    Terminate,
}

impl Msg {
    fn encode(&self, buf: &mut BytesMut) {
        match self {
            Msg::Query(text) => frontend::query(text, buf).expect("a query text has no NUL"),
            Msg::Parse { name, query, types } => {
                frontend::parse(name, query, types.iter().copied(), buf)
                    .expect("a statement has no NUL")
            }
            Msg::Bind {
                portal,
                statement,
                params,
                binary,
            } => frontend::bind(
                portal,
                statement,
                std::iter::empty::<i16>(),
                params.iter(),
                |value, buf| match value {
                    Some(text) => {
                        buf.extend_from_slice(text.as_bytes());
                        Ok(IsNull::No)
                    }
                    None => Ok(IsNull::Yes),
                },
                if *binary { vec![1] } else { vec![] },
                buf,
            )
            .map_err(|_| "bind")
            .expect("a Bind of text parameters encodes"),
            Msg::Describe { kind, name } => {
                frontend::describe(*kind, name, buf).expect("a name has no NUL")
            }
            Msg::Execute { portal, max_rows } => {
                frontend::execute(portal, *max_rows, buf).expect("a name has no NUL")
            }
            Msg::Close { kind, name } => {
                frontend::close(*kind, name, buf).expect("a name has no NUL")
            }
            Msg::Sync => frontend::sync(buf),
            Msg::Flush => frontend::flush(buf),
            Msg::CopyData(data) => frontend::CopyData::new(data.as_bytes())
                .expect("small copy data")
                .write(buf),
            Msg::CopyDone => frontend::copy_done(buf),
            Msg::CopyFail(why) => frontend::copy_fail(why, buf).expect("a message has no NUL"),
            Msg::Terminate => frontend::terminate(buf),
        }
    }
}

impl fmt::Display for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Msg::Query(text) => write!(f, "Query {text:?}"),
            Msg::Parse { name, query, types } if types.is_empty() => {
                write!(f, "Parse {name:?} {query:?}")
            }
            Msg::Parse { name, query, types } => write!(f, "Parse {name:?} {query:?} {types:?}"),
            Msg::Bind {
                portal,
                statement,
                params,
                binary,
            } => {
                let params: Vec<String> = params
                    .iter()
                    .map(|p| p.clone().unwrap_or_else(|| "NULL".into()))
                    .collect();
                write!(f, "Bind {portal:?} {statement:?} {params:?}")?;
                if *binary {
                    write!(f, " binary results")?;
                }
                Ok(())
            }
            Msg::Describe { kind, name } => write!(f, "Describe {} {name:?}", *kind as char),
            Msg::Execute { portal, max_rows } => write!(f, "Execute {portal:?} {max_rows}"),
            Msg::Close { kind, name } => write!(f, "Close {} {name:?}", *kind as char),
            Msg::Sync => write!(f, "Sync"),
            Msg::Flush => write!(f, "Flush"),
            Msg::CopyData(data) => write!(f, "CopyData {data:?}"),
            Msg::CopyDone => write!(f, "CopyDone"),
            Msg::CopyFail(why) => write!(f, "CopyFail {why:?}"),
            Msg::Terminate => write!(f, "Terminate"),
        }
    }
}

/// What the client reads after a write, in order.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Up to a ReadyForQuery (a Query or a Sync).
    Ready,
    /// A COPY FROM STDIN through the extended protocol as libpq sends it: Parse, Bind,
    /// Execute, Sync, the data, CopyDone or CopyFail, Sync. In copy-in mode PostgreSQL
    /// ignores the first Sync, so one ReadyForQuery when a CopyInResponse came, two when the
    /// COPY failed before it started.
    CopyIn,
    /// After a Flush: an answer to each of the group's messages not yet answered, unless an
    /// error ends them (and the rest of the group is skipped until Sync).
    Flushed(usize),
    /// The last query of a clean session: exactly RowDescription, the DataRow with this
    /// step's token, CommandComplete and ReadyForQuery. An answer left over earlier, or one
    /// too few, shows here.
    Sentinel(u64),
}

#[derive(Clone, Default)]
struct Write {
    msgs: Vec<Msg>,
    /// Byte offsets where the write is split into several (with a pause between them).
    cuts: Vec<usize>,
    expect: Vec<Expect>,
}

impl Write {
    fn bytes(&self) -> BytesMut {
        let mut buf = BytesMut::new();
        for msg in &self.msgs {
            msg.encode(&mut buf);
        }
        buf
    }
}

#[derive(Clone)]
struct Script {
    id: SessionId,
    writes: Vec<Write>,
    ending: &'static str,
    next_step: u64,
}

impl Script {
    fn message_count(&self) -> usize {
        self.writes.iter().map(|w| w.msgs.len()).sum()
    }

    /// The write whose messages carry `step`'s token.
    fn write_of_step(&self, client: usize, step: u64) -> Option<usize> {
        let token = format!("c{client}-s{step}");
        self.writes.iter().position(|w| {
            w.msgs.iter().any(|m| {
                let text = m.to_string();
                text.contains(&format!("~{token}~")) || text.contains(&format!("#{token}#"))
            })
        })
    }

    /// The session's messages, up to write `upto` (all without).
    fn render(&self, upto: Option<usize>) -> String {
        let mut out = format!(
            "    session {} ({}; table {}):\n",
            self.id,
            self.ending,
            table(self.id.client)
        );
        let last = upto
            .unwrap_or(usize::MAX)
            .min(self.writes.len().saturating_sub(1));
        for (i, write) in self.writes.iter().enumerate().take(last + 1) {
            let cuts = if write.cuts.is_empty() {
                String::new()
            } else {
                format!(", split at bytes {:?}", write.cuts)
            };
            out.push_str(&format!(
                "      write {i}{cuts}, then read {:?}:\n",
                write.expect
            ));
            for msg in &write.msgs {
                out.push_str(&format!("        {msg}\n"));
            }
        }
        if last + 1 < self.writes.len() {
            out.push_str(&format!(
                "      ... {} more writes\n",
                self.writes.len() - last - 1
            ));
        }
        out
    }
}

impl fmt::Display for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(None))
    }
}

// ---------------------------------------------------------------------------------------
// The generator

/// Generates a session's messages from its seed alone (never from answers), so that the
/// same session can be sent to PostgreSQL and to the proxy. It keeps a rough model of the
/// statements and portals that may exist, to make most messages meaningful; where the model
/// is wrong, the server answers with an error, which is as deterministic as a result.
struct Gen {
    rng: StdRng,
    client: usize,
    step: u64,
    table: String,
    statements: BTreeMap<String, usize>,
    unnamed: Option<usize>,
    portals: BTreeSet<String>,
    /// Extended messages sent since the last Sync.
    group_open: bool,
    /// Extended messages of the open group whose answers have not been read.
    unanswered: usize,
    /// A Bind of the unnamed portal since the last Sync or Query: only then may Execute or
    /// Describe name it (see [`avoids_unnamed_portal_crash`]).
    bound_unnamed: bool,
}

impl Script {
    fn generate(seed: u64, id: SessionId) -> Script {
        let mut gen = Gen {
            rng: StdRng::seed_from_u64(id.seed(seed)),
            client: id.client,
            step: id.start_step,
            table: table(id.client),
            statements: BTreeMap::new(),
            unnamed: None,
            portals: BTreeSet::new(),
            group_open: false,
            unanswered: 0,
            bound_unnamed: false,
        };
        let mut writes = Vec::new();
        for _ in 0..gen.rng.random_range(2..=14) {
            writes.push(gen.write());
        }
        if gen.group_open {
            let mut last = Write::default();
            gen.sync(&mut last);
            writes.push(last);
        }
        let ending = gen.ending(&mut writes);
        for write in &mut writes {
            let len = write.bytes().len();
            if len > 1 && gen.rng.random_bool(0.35) {
                let mut cuts: Vec<usize> = (0..gen.rng.random_range(1..=4))
                    .map(|_| gen.rng.random_range(1..len))
                    .collect();
                cuts.sort_unstable();
                cuts.dedup();
                write.cuts = cuts;
            }
        }
        assert!(
            avoids_unnamed_portal_crash(&writes),
            "session {id}: the generator named the unnamed portal without binding it"
        );
        Script {
            id,
            writes,
            ending,
            next_step: gen.step + 1,
        }
    }
}

/// PostgreSQL (15.20 and 17.10 alike) reads freed memory, and may crash, when an Execute or
/// a Describe names the unnamed portal left behind by a simple Query that failed while it
/// ran (not while it was parsed or planned) inside a transaction block: that portal stays,
/// failed, with its plan in a memory context the next messages reuse. For example: BEGIN;
/// `COPY t FROM STDIN` whose data break its primary key; a few more queries; then
/// `Execute ""`, Sync: the backend dies of SIGSEGV. This fuzzer is about the proxy, so its
/// sessions never name the unnamed portal without a Bind of it since the last Sync or
/// Query (a portal from Bind holds its plan safely).
fn avoids_unnamed_portal_crash(writes: &[Write]) -> bool {
    let mut bound = false;
    for msg in writes.iter().flat_map(|w| &w.msgs) {
        match msg {
            Msg::Sync | Msg::Query(_) => bound = false,
            Msg::Bind { portal, .. } if portal.is_empty() => bound = true,
            Msg::Execute { portal, .. } if portal.is_empty() && !bound => return false,
            Msg::Describe { kind: b'P', name } if name.is_empty() && !bound => return false,
            _ => {}
        }
    }
    true
}

impl Gen {
    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.rng.random_range(0..items.len())].clone()
    }

    /// A new step: its token for results (`~c3-s17~`) and for stored rows (`#c3-s17#`).
    fn tokens(&mut self) -> (String, String) {
        self.step += 1;
        let token = format!("c{}-s{}", self.client, self.step);
        (format!("~{token}~"), format!("#{token}#"))
    }

    /// One write: one to three steps, pipelined. A group left open by a Flush ends it.
    fn write(&mut self) -> Write {
        let mut w = Write::default();
        let steps = self.pick(&[1, 1, 1, 2, 2, 3]);
        for i in 0..steps {
            let last = i + 1 == steps;
            if self.group_open {
                self.group(&mut w, last);
            } else {
                match self.rng.random_range(0..100) {
                    0..=29 => self.simple_query(&mut w),
                    30..=64 => self.group(&mut w, last),
                    65..=74 => self.copy_in_simple(&mut w),
                    75..=81 => self.copy_in_extended(&mut w),
                    82..=87 => {
                        let setting = self.setting();
                        self.query(&mut w, setting);
                    }
                    88..=93 => {
                        let control = self.transaction_control();
                        self.query(&mut w, control);
                    }
                    _ => self.known_pattern(&mut w),
                }
            }
            if self.group_open {
                break;
            }
        }
        w
    }

    fn query(&mut self, w: &mut Write, text: String) {
        self.bound_unnamed = false;
        w.msgs.push(Msg::Query(text));
        w.expect.push(Expect::Ready);
        // A simple Query drops the unnamed statement and portal.
        self.unnamed = None;
        self.portals.remove("");
    }

    /// A simple Query of one statement or several.
    fn simple_query(&mut self, w: &mut Write) {
        let count = self.pick(&[1, 1, 1, 2, 3, 4]);
        let mut parts = Vec::new();
        while parts.len() < count {
            let (text, _) = self.statement(false);
            if !text.is_empty() || count == 1 {
                parts.push(text);
            }
        }
        self.query(w, parts.join("; "));
    }

    /// A statement and how many parameters it takes ($1 with `with_params`, or a literal).
    fn statement(&mut self, with_params: bool) -> (String, usize) {
        let (result, stored) = self.tokens();
        let t = self.table.clone();
        let literal = self.rng.random_range(1..=60).to_string();
        let (arg, n) = if with_params {
            ("$1::int".to_string(), 1)
        } else {
            (literal, 0)
        };
        // With the read cache: reads whose text repeats (no token), a third of the time, so
        // that answers come from the cache and are compared with PostgreSQL's.
        if cache_mode() && self.rng.random_range(0..2) == 0 {
            // Few texts, so that each comes often enough to be decided, filled and hit.
            let arg = if with_params {
                "$1::int".to_string()
            } else {
                self.rng.random_range(1..=2).to_string()
            };
            return match self.rng.random_range(0..3) {
                0 => (format!("SELECT id, note FROM {t} WHERE id = {arg}"), n),
                1 => (format!("SELECT count(*), max(note) FROM {t}"), 0),
                _ => (
                    format!("SELECT id, note FROM {t} WHERE id < {arg} ORDER BY id"),
                    n,
                ),
            };
        }
        match self.rng.random_range(0..100) {
            0..=11 => (format!("SELECT '{result}' AS tok, {arg} + 1 AS n"), n),
            12..=21 => (
                format!("SELECT '{result}' AS tok, g FROM generate_series(1, 4) AS g"),
                0,
            ),
            22..=28 => (
                format!("SELECT '{result}' AS tok, id, note FROM {t} ORDER BY id LIMIT 12"),
                0,
            ),
            29..=38 => (format!("INSERT INTO {t} VALUES ({arg}, '{stored}')"), n),
            39..=43 => (
                format!("UPDATE {t} SET note = '{stored}' WHERE id = {arg}"),
                n,
            ),
            44..=45 => (format!("DELETE FROM {t} WHERE id = {arg}"), n),
            46 => (format!("DELETE FROM {t} WHERE id > 40"), 0),
            47..=52 => (
                format!(
                    "SELECT '{result}' AS tok, current_setting('TimeZone') AS zone, \
                     current_setting('search_path') AS path, \
                     current_setting('statement_timeout') AS timeout"
                ),
                0,
            ),
            // The same text for every client: the proxy names server-side statements after
            // their text, so clients share this one.
            53..=56 => (format!("SELECT {arg} * 2 AS doubled"), n),
            57..=59 => (format!("SELECT 1 / 0 AS boom, '{result}' AS tok"), 0),
            60..=62 => (format!("SELEKT '{result}'"), 0),
            63..=65 => (format!("SELECT '{result}' AS tok FROM fz_nosuch"), 0),
            66..=67 => (format!("SELECT '{result}'::int"), 0),
            68..=77 => (self.transaction_control(), 0),
            78..=85 => (self.setting(), 0),
            86..=91 => (
                format!("COPY (SELECT '{result}', g FROM generate_series(1, 3) AS g) TO STDOUT"),
                0,
            ),
            92..=95 => (
                format!("COPY (SELECT id, note FROM {t} ORDER BY id LIMIT 5) TO STDOUT"),
                0,
            ),
            // EmptyQueryResponse.
            _ => (String::new(), 0),
        }
    }

    fn transaction_control(&mut self) -> String {
        self.pick(&[
            "BEGIN",
            "BEGIN",
            "BEGIN ISOLATION LEVEL REPEATABLE READ",
            // Whole transactions a shadow capture takes (SWITCHYARD_FUZZ_SHADOW).
            "BEGIN READ ONLY",
            "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
            "COMMIT",
            "COMMIT",
            "ROLLBACK",
            "SAVEPOINT sp",
            "ROLLBACK TO SAVEPOINT sp",
            "RELEASE SAVEPOINT sp",
        ])
        .to_string()
    }

    /// SET and RESET of settings a proxy must follow. No value makes a statement's outcome
    /// depend on timing (a statement_timeout is never under a second).
    fn setting(&mut self) -> String {
        self.pick(&[
            "SET statement_timeout = '5s'",
            "SET statement_timeout TO '1min'",
            "SET statement_timeout = 0",
            "SET SESSION statement_timeout = '30s'",
            "SET TimeZone = 'Asia/Tokyo'",
            "SET TimeZone TO 'America/Lima'",
            "SET TimeZone = 'UTC'",
            "SET LOCAL TimeZone = 'Asia/Kolkata'",
            "SET search_path = pg_catalog, public",
            "SET search_path TO public",
            "SET search_path = ''",
            "RESET TimeZone",
            "RESET statement_timeout",
            "RESET search_path",
            "RESET ALL",
        ])
        .to_string()
    }

    /// A message of the open group that gets an answer.
    fn ext(&mut self, w: &mut Write, msg: Msg) {
        self.group_open = true;
        self.unanswered += 1;
        w.msgs.push(msg);
    }

    fn sync(&mut self, w: &mut Write) {
        self.bound_unnamed = false;
        w.msgs.push(Msg::Sync);
        w.expect.push(Expect::Ready);
        self.group_open = false;
        self.unanswered = 0;
        // Outside a transaction block a Sync ends the portals; the model does not know
        // whether the session is in one, and mostly forgets them.
        if self.rng.random_bool(0.7) {
            self.portals.clear();
        }
    }

    /// Extended-protocol messages, then a Sync, or (when the write may end here) a Flush
    /// whose answers are read before the group goes on in the next write.
    fn group(&mut self, w: &mut Write, may_stay_open: bool) {
        for _ in 0..self.rng.random_range(1..=4) {
            self.group_item(w);
        }
        if may_stay_open && self.rng.random_bool(0.25) {
            w.msgs.push(Msg::Flush);
            w.expect.push(Expect::Flushed(self.unanswered));
            self.group_open = true;
            self.unanswered = 0;
        } else {
            self.sync(w);
        }
    }

    fn group_item(&mut self, w: &mut Write) {
        match self.rng.random_range(0..100) {
            // What drivers send for a query.
            0..=34 => {
                let name = self.pick(&["", "", "", "s1", "s2", "s3"]).to_string();
                let (query, n) = self.statement(true);
                self.parse(w, &name, query, n);
                let portal = self.pick(&["", "", "", "p1", "p2"]).to_string();
                self.bind(w, &portal, &name, n);
                if self.rng.random_bool(0.5) {
                    self.ext(
                        w,
                        Msg::Describe {
                            kind: b'P',
                            name: portal.clone(),
                        },
                    );
                }
                let max_rows = self.pick(&[0, 0, 0, 1, 2]);
                self.ext(w, Msg::Execute { portal, max_rows });
            }
            35..=49 => {
                let name = self.pick(&["", "", "s1", "s2", "s3"]).to_string();
                let (query, n) = self.statement(true);
                self.parse(w, &name, query, n);
            }
            50..=61 => {
                let (statement, n) = self.some_statement();
                let portal = self.pick(&["", "", "p1", "p2"]).to_string();
                self.bind(w, &portal, &statement, n);
            }
            62..=73 => {
                let portal = self.runnable_portal();
                let max_rows = self.pick(&[0, 0, 1, 2]);
                self.ext(w, Msg::Execute { portal, max_rows });
            }
            74..=83 => {
                let msg = if self.rng.random_bool(0.5) {
                    Msg::Describe {
                        kind: b'S',
                        name: self.some_statement().0,
                    }
                } else {
                    Msg::Describe {
                        kind: b'P',
                        name: self.runnable_portal(),
                    }
                };
                self.ext(w, msg);
            }
            84..=93 => {
                let msg = if self.rng.random_bool(0.5) {
                    let name = self.some_statement().0;
                    self.close_statement_in_model(&name);
                    Msg::Close { kind: b'S', name }
                } else {
                    let name = self.some_portal();
                    self.portals.remove(&name);
                    Msg::Close { kind: b'P', name }
                };
                self.ext(w, msg);
            }
            // A Flush no one waits for: the answers so far go out early, and the group's
            // ReadyForQuery reads them.
            _ => w.msgs.push(Msg::Flush),
        }
    }

    fn close_statement_in_model(&mut self, name: &str) {
        if name.is_empty() {
            self.unnamed = None;
        } else {
            self.statements.remove(name);
        }
    }

    /// Mostly one the model knows, sometimes any name, or one that never exists.
    fn some_statement(&mut self) -> (String, usize) {
        let mut known: Vec<(String, usize)> = self
            .statements
            .iter()
            .map(|(name, n)| (name.clone(), *n))
            .collect();
        if let Some(n) = self.unnamed {
            known.push((String::new(), n));
        }
        if !known.is_empty() && self.rng.random_bool(0.75) {
            return self.pick(&known);
        }
        let name = self.pick(&["", "s1", "s2", "s3", "nosuch"]).to_string();
        let n = self
            .statements
            .get(&name)
            .copied()
            .unwrap_or_else(|| self.rng.random_range(0..=1));
        (name, n)
    }

    /// A portal for Execute or Describe: the unnamed one only once bound in this group.
    fn runnable_portal(&mut self) -> String {
        let portal = self.some_portal();
        if portal.is_empty() && !self.bound_unnamed {
            return self.pick(&["p1", "p2", "nosuch"]).to_string();
        }
        portal
    }

    fn some_portal(&mut self) -> String {
        let known: Vec<String> = self.portals.iter().cloned().collect();
        if !known.is_empty() && self.rng.random_bool(0.75) {
            return self.pick(&known);
        }
        self.pick(&["", "p1", "p2", "nosuch"]).to_string()
    }

    /// A Parse; a name the model knows is mostly closed first, and sometimes parsed again
    /// as it is (PostgreSQL: 42P05).
    fn parse(&mut self, w: &mut Write, name: &str, query: String, n: usize) {
        if !name.is_empty() && self.statements.contains_key(name) && self.rng.random_bool(0.5) {
            self.ext(
                w,
                Msg::Close {
                    kind: b'S',
                    name: name.to_string(),
                },
            );
        }
        let types = if n == 1 && self.rng.random_bool(0.3) {
            vec![23]
        } else {
            vec![]
        };
        self.ext(
            w,
            Msg::Parse {
                name: name.to_string(),
                query,
                types,
            },
        );
        if name.is_empty() {
            self.unnamed = Some(n);
        } else {
            self.statements.insert(name.to_string(), n);
        }
    }

    /// A Bind with the parameters the statement takes (now and then one too many or too
    /// few); a named portal the model knows is mostly closed first.
    fn bind(&mut self, w: &mut Write, portal: &str, statement: &str, n: usize) {
        if !portal.is_empty() && self.portals.contains(portal) && self.rng.random_bool(0.6) {
            self.ext(
                w,
                Msg::Close {
                    kind: b'P',
                    name: portal.to_string(),
                },
            );
        }
        let count = match self.rng.random_range(0..100) {
            0..=2 => n + 1,
            3..=4 if n > 0 => n - 1,
            _ => n,
        };
        let params = (0..count)
            .map(|_| {
                if self.rng.random_bool(0.05) {
                    None
                } else {
                    Some(self.rng.random_range(1..=60).to_string())
                }
            })
            .collect();
        let binary = self.rng.random_bool(0.15);
        if portal.is_empty() {
            self.bound_unnamed = true;
        }
        self.ext(
            w,
            Msg::Bind {
                portal: portal.to_string(),
                statement: statement.to_string(),
                params,
                binary,
            },
        );
        self.portals.insert(portal.to_string());
    }

    /// Rows for COPY FROM STDIN, in one to three CopyData messages cut anywhere (a row may
    /// span two), maybe a Flush among them (ignored in copy-in mode), then CopyDone or
    /// CopyFail.
    fn copy_stream(&mut self, w: &mut Write) {
        let (_, stored) = self.tokens();
        let mut data = String::new();
        for _ in 0..self.rng.random_range(1..=4) {
            if self.rng.random_bool(0.06) {
                // 22P02 in the middle of the data.
                data.push_str("oops\tbad row\n");
            } else {
                let id = if self.rng.random_bool(0.1) {
                    self.rng.random_range(1..=40)
                } else {
                    self.rng.random_range(41..=400)
                };
                data.push_str(&format!("{id}\t{stored}\n"));
            }
        }
        let mut cuts: Vec<usize> = (0..self.rng.random_range(0..=2))
            .map(|_| self.rng.random_range(1..data.len()))
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut at = 0;
        for cut in cuts.into_iter().chain([data.len()]) {
            w.msgs.push(Msg::CopyData(data[at..cut].to_string()));
            if self.rng.random_bool(0.1) {
                w.msgs.push(Msg::Flush);
            }
            at = cut;
        }
        if self.rng.random_bool(0.12) {
            w.msgs
                .push(Msg::CopyFail("the fuzzer changed its mind".into()));
        } else {
            w.msgs.push(Msg::CopyDone);
        }
    }

    /// COPY FROM STDIN by simple Query with its data in the same write. If the COPY fails
    /// before copy-in (an aborted transaction), PostgreSQL ignores the data that follows.
    fn copy_in_simple(&mut self, w: &mut Write) {
        let t = self.table.clone();
        self.query(w, format!("COPY {t} (id, note) FROM STDIN"));
        self.copy_stream(w);
    }

    /// COPY FROM STDIN as libpq sends it through the extended protocol, then a simple Query:
    /// it drops the unnamed statement and portal, which hold the COPY, so that no later Bind
    /// of the unnamed statement starts a copy-in the generator does not know of.
    fn copy_in_extended(&mut self, w: &mut Write) {
        let t = self.table.clone();
        w.msgs.push(Msg::Parse {
            name: String::new(),
            query: format!("COPY {t} (id, note) FROM STDIN"),
            types: vec![],
        });
        w.msgs.push(Msg::Bind {
            portal: String::new(),
            statement: String::new(),
            params: vec![],
            binary: false,
        });
        if self.rng.random_bool(0.4) {
            w.msgs.push(Msg::Describe {
                kind: b'P',
                name: String::new(),
            });
        }
        w.msgs.push(Msg::Execute {
            portal: String::new(),
            max_rows: 0,
        });
        w.msgs.push(Msg::Sync);
        self.copy_stream(w);
        w.msgs.push(Msg::Sync);
        w.expect.push(Expect::CopyIn);
        let text = self.select();
        self.query(w, text);
    }

    /// A query whose one row is this step's token.
    fn select(&mut self) -> String {
        let (result, _) = self.tokens();
        format!("SELECT '{result}' AS tok, 1 AS n")
    }

    /// The known bugs' shapes, so that each comes up often, whatever else is drawn.
    fn known_pattern(&mut self, w: &mut Write) {
        match self.rng.random_range(0..4) {
            // (A) COPY FROM STDIN, its data and an extended query, in one write.
            0 => {
                self.copy_in_simple(w);
                let query = self.select();
                self.parse(w, "", query, 0);
                self.bind(w, "", "", 0);
                self.ext(
                    w,
                    Msg::Execute {
                        portal: String::new(),
                        max_rows: 0,
                    },
                );
                self.sync(w);
            }
            // (D) a named statement parsed twice (PostgreSQL: 42P05).
            1 => {
                let name = self.pick(&["s1", "s2", "s3"]).to_string();
                let (query, n) = self.statement(true);
                self.ext(
                    w,
                    Msg::Parse {
                        name: name.clone(),
                        query,
                        types: vec![],
                    },
                );
                self.sync(w);
                let (query, _) = self.statement(true);
                self.ext(
                    w,
                    Msg::Parse {
                        name: name.clone(),
                        query,
                        types: vec![],
                    },
                );
                self.statements.insert(name.clone(), n);
                self.bind(w, "", &name, n);
                self.ext(
                    w,
                    Msg::Execute {
                        portal: String::new(),
                        max_rows: 0,
                    },
                );
                self.sync(w);
            }
            // (E) Close of a portal, then a Parse, in one group.
            2 => {
                self.ext(
                    w,
                    Msg::Close {
                        kind: b'S',
                        name: "s3".into(),
                    },
                );
                self.statements.remove("s3");
                self.sync(w);
                self.ext(
                    w,
                    Msg::Close {
                        kind: b'P',
                        name: "p2".into(),
                    },
                );
                self.portals.remove("p2");
                let (query, n) = self.statement(true);
                self.parse(w, "s3", query, n);
                if self.rng.random_bool(0.6) {
                    self.bind(w, "", "s3", n);
                    self.ext(
                        w,
                        Msg::Execute {
                            portal: String::new(),
                            max_rows: 0,
                        },
                    );
                }
                self.sync(w);
            }
            // (F) the unnamed statement after a simple Query, which dropped it (26000).
            _ => {
                let query = self.select();
                self.parse(w, "", query, 0);
                self.sync(w);
                let text = self.select();
                self.query(w, text);
                self.bind(w, "", "", 0);
                self.ext(
                    w,
                    Msg::Execute {
                        portal: String::new(),
                        max_rows: 0,
                    },
                );
                self.sync(w);
            }
        }
    }

    /// The session's last writes: a clean end (ROLLBACK, a sentinel query checked exactly,
    /// then Terminate or a closed socket), or an abandoned transaction (BEGIN, INSERTs marked
    /// `abandoned`, then Terminate or a closed socket, nothing read): nothing of it may ever
    /// be committed.
    fn ending(&mut self, writes: &mut Vec<Write>) -> &'static str {
        if self.rng.random_bool(0.65) {
            let (result, _) = self.tokens();
            writes.push(Write {
                msgs: vec![
                    Msg::Query("ROLLBACK".into()),
                    Msg::Query(format!("SELECT '{result}' AS sentinel")),
                ],
                cuts: vec![],
                expect: vec![Expect::Ready, Expect::Sentinel(self.step)],
            });
            if self.rng.random_bool(0.7) {
                writes.push(Write {
                    msgs: vec![Msg::Terminate],
                    ..Write::default()
                });
                "clean, then Terminate"
            } else {
                "clean, then the socket closes"
            }
        } else {
            let t = self.table.clone();
            let (_, stored) = self.tokens();
            let id = self.rng.random_range(1..=400);
            let mut w = Write::default();
            w.msgs.push(Msg::Query(format!(
                "BEGIN; INSERT INTO {t} VALUES ({id}, '{stored}abandoned')"
            )));
            if self.rng.random_bool(0.5) {
                let (_, stored) = self.tokens();
                w.msgs.push(Msg::Parse {
                    name: String::new(),
                    query: format!("INSERT INTO {t} VALUES ($1::int, '{stored}abandoned')"),
                    types: vec![],
                });
                w.msgs.push(Msg::Bind {
                    portal: String::new(),
                    statement: String::new(),
                    params: vec![Some(self.rng.random_range(1..=400).to_string())],
                    binary: false,
                });
                w.msgs.push(Msg::Execute {
                    portal: String::new(),
                    max_rows: 0,
                });
                if self.rng.random_bool(0.5) {
                    // Inside the block a Sync commits nothing.
                    w.msgs.push(Msg::Sync);
                }
            }
            let terminate = self.rng.random_bool(0.5);
            if terminate {
                w.msgs.push(Msg::Terminate);
            }
            writes.push(w);
            if terminate {
                "abandons a transaction: Terminate, answers unread"
            } else {
                "abandons a transaction: the socket closes, answers unread"
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The client

#[derive(Clone)]
struct Target {
    name: &'static str,
    port: u16,
    user: String,
    password: String,
    database: String,
}

struct Targets {
    direct: Target,
    transaction: Target,
    session: Target,
}

impl Targets {
    fn proxy(&self, mode: &str) -> &Target {
        if mode == "session" {
            &self.session
        } else {
            &self.transaction
        }
    }
}

enum Stop {
    Hang,
    Closed(String),
    /// What went wrong (the same for the same cause), and the details.
    Desync(&'static str, String),
}

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    /// A read that waits longer is a hang.
    hang: Duration,
    /// The last FATAL error, which explains a close.
    fatal: Option<String>,
}

impl Conn {
    /// Startup and login (SCRAM-SHA-256: the proxy accepts nothing else, and the test
    /// servers use it too), up to the first ReadyForQuery.
    async fn open(target: &Target, hang: Duration) -> Result<Conn, String> {
        let stream = tokio::time::timeout(hang, TcpStream::connect(("127.0.0.1", target.port)))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut conn = Conn {
            stream,
            buf: BytesMut::new(),
            hang,
            fatal: None,
        };
        let mut out = BytesMut::new();
        frontend::startup_message(
            [
                ("user", target.user.as_str()),
                ("database", target.database.as_str()),
                ("application_name", APPLICATION),
            ],
            &mut out,
        )
        .map_err(|e| e.to_string())?;
        conn.send_all(&out).await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, body) = conn.recv().await.map_err(|stop| match stop {
                Stop::Hang => "no answer during login".to_string(),
                Stop::Closed(why) | Stop::Desync(_, why) => format!("login: {why}"),
            })?;
            match tag {
                b'R' if body.len() >= 4 => {
                    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    let data = &body[4..];
                    let mut out = BytesMut::new();
                    match code {
                        0 => continue,
                        10 => {
                            if !data.split(|b| *b == 0).any(|m| m == b"SCRAM-SHA-256") {
                                return Err("the server offers no SCRAM-SHA-256".into());
                            }
                            let s = ScramSha256::new(
                                target.password.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                                .map_err(|e| e.to_string())?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or("SASLContinue before SASL")?;
                            s.update(data).map_err(|e| format!("SCRAM: {e}"))?;
                            frontend::sasl_response(s.message(), &mut out)
                                .map_err(|e| e.to_string())?;
                        }
                        12 => {
                            let s = scram.as_mut().ok_or("SASLFinal before SASL")?;
                            s.finish(data).map_err(|e| format!("SCRAM: {e}"))?;
                            continue;
                        }
                        other => {
                            return Err(format!("authentication request {other}: not spoken here"))
                        }
                    }
                    conn.send_all(&out).await?;
                }
                b'E' => return Err(format!("login refused: {}", show(tag, &body))),
                b'Z' => return Ok(conn),
                // ParameterStatus, BackendKeyData, notices.
                _ => {}
            }
        }
    }

    async fn send_all(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| format!("write: {e}"))
    }

    /// A write, in pieces where it is cut, with a short pause between them so that each
    /// piece arrives on its own.
    async fn send(&mut self, write: &Write) -> Result<(), String> {
        let bytes = write.bytes();
        let mut at = 0;
        for &cut in write.cuts.iter().chain([&bytes.len()]) {
            self.send_all(&bytes[at..cut]).await?;
            if cut < bytes.len() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            at = cut;
        }
        Ok(())
    }

    /// One backend message: its type and body.
    async fn recv(&mut self) -> Result<(u8, Bytes), Stop> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if !(4..=1 << 30).contains(&len) {
                    return Err(Stop::Closed(format!(
                        "a backend message claims {len} bytes"
                    )));
                }
                if self.buf.len() > len {
                    let mut frame = self.buf.split_to(1 + len).freeze();
                    let body = frame.split_off(5);
                    if frame[0] == b'E' && is_fatal(&body) {
                        self.fatal = Some(show(b'E', &body));
                    }
                    return Ok((frame[0], body));
                }
            }
            self.buf.reserve(8192);
            match tokio::time::timeout(self.hang, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(Stop::Hang),
                Ok(Ok(0)) => {
                    let why = match &self.fatal {
                        Some(fatal) => format!("the connection closed after {fatal}"),
                        None => "the connection closed".to_string(),
                    };
                    return Err(Stop::Closed(why));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(Stop::Closed(format!("read: {e}"))),
            }
        }
    }
}

/// An answer, and the write it followed.
struct Answer {
    write: usize,
    tag: u8,
    body: Bytes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// An answer carrying another client's token.
    CrossClient,
    /// No answer within [`HANG`].
    Hang,
    /// An answer where none belongs (a ReadyForQuery after a Flush, a wrong sentinel).
    Desync,
    /// The connection closed or could not be opened.
    Closed,
    /// Rows of an abandoned transaction were committed.
    Committed,
    /// A server connection stayed busy or in a transaction after its client left.
    Leaked,
    /// A differential session answered differently through the proxy.
    Difference,
    /// A PostgreSQL backend crashed.
    ServerCrash,
    /// PostgreSQL itself tripped a check: the fuzzer is wrong.
    Fuzzer,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::CrossClient => "cross-client answers",
            Kind::Hang => "hangs",
            Kind::Desync => "desynchronised answers",
            Kind::Closed => "closed connections",
            Kind::Committed => "abandoned transactions committed",
            Kind::Leaked => "server connections left busy",
            Kind::Difference => "differences",
            Kind::ServerCrash => "PostgreSQL backend crashes",
            Kind::Fuzzer => "fuzzer errors (PostgreSQL itself tripped a check)",
        }
    }
}

struct Problem {
    kind: Kind,
    /// What failures of the same cause have in common, to count them and show one of each.
    signature: String,
    detail: String,
    /// The session's write the failure showed after.
    at_write: Option<usize>,
    /// The other client's (client, step), for a cross-client answer.
    foreign: Option<(usize, u64)>,
}

impl Problem {
    fn new(kind: Kind, signature: impl Into<String>, detail: String) -> Problem {
        Problem {
            kind,
            signature: signature.into(),
            detail,
            at_write: None,
            foreign: None,
        }
    }
}

#[derive(Default)]
struct Run {
    /// Differences from PostgreSQL's answers allowed as documented limits.
    allowed: usize,
    answers: Vec<Answer>,
    sent: usize,
    problems: Vec<Problem>,
}

/// Sends a session's writes and reads what each expects, checking every answer.
async fn run_session(target: &Target, script: &Script, hang: Duration) -> Run {
    let mut run = Run::default();
    let mut conn = match Conn::open(target, hang).await {
        Ok(conn) => conn,
        Err(e) => {
            run.problems.push(Problem::new(
                Kind::Closed,
                "login failed",
                format!("{}: {e}", target.name),
            ));
            return run;
        }
    };
    let client = script.id.client;
    // An error since the last ReadyForQuery: the server skips the rest of the group.
    let mut group_failed = false;
    for (w, write) in script.writes.iter().enumerate() {
        if let Err(e) = conn.send(write).await {
            let mut problem = Problem::new(
                Kind::Closed,
                "a write failed",
                format!("{}: write {w}: {e}", target.name),
            );
            problem.at_write = Some(w);
            run.problems.push(problem);
            return run;
        }
        run.sent += write.msgs.len();
        for &expect in &write.expect {
            let result =
                read_expected(&mut conn, &mut run, client, w, expect, &mut group_failed).await;
            if let Err(stop) = result {
                let reading = expect.name();
                let (kind, signature, why) = match stop {
                    Stop::Hang => (
                        Kind::Hang,
                        format!("no answer while reading {reading}"),
                        format!("no answer within {hang:?}"),
                    ),
                    Stop::Closed(why) => {
                        (Kind::Closed, format!("closed while reading {reading}"), why)
                    }
                    Stop::Desync(what, why) => {
                        (Kind::Desync, what.to_string(), format!("{what}: {why}"))
                    }
                };
                let mut problem = Problem::new(
                    kind,
                    signature,
                    format!(
                        "{}: while reading {expect:?} after write {w}: {why}",
                        target.name
                    ),
                );
                problem.at_write = Some(w);
                run.problems.push(problem);
                return run;
            }
        }
    }
    run
}

impl Expect {
    fn name(self) -> &'static str {
        match self {
            Expect::Ready => "the ReadyForQuery of a Query or Sync",
            Expect::CopyIn => "the answers to an extended-protocol COPY FROM STDIN",
            Expect::Flushed(_) => "the answers after a Flush",
            Expect::Sentinel(_) => "the last query's answer",
        }
    }
}

async fn read_expected(
    conn: &mut Conn,
    run: &mut Run,
    client: usize,
    write: usize,
    expect: Expect,
    group_failed: &mut bool,
) -> Result<(), Stop> {
    match expect {
        Expect::Ready => {
            while next(conn, run, client, write).await? != b'Z' {}
            *group_failed = false;
        }
        Expect::CopyIn => {
            let mut copy_in = false;
            loop {
                match next(conn, run, client, write).await? {
                    b'G' => copy_in = true,
                    b'Z' => break,
                    _ => {}
                }
            }
            if !copy_in {
                while next(conn, run, client, write).await? != b'Z' {}
            }
            *group_failed = false;
        }
        Expect::Flushed(count) => {
            let mut answered = 0;
            while !*group_failed && answered < count {
                match next(conn, run, client, write).await? {
                    b'E' => *group_failed = true,
                    b'Z' => {
                        return Err(Stop::Desync(
                            "a ReadyForQuery after a Flush, with no Sync sent",
                            String::new(),
                        ))
                    }
                    // ParseComplete, BindComplete, CloseComplete, RowDescription or NoData
                    // (the end of a Describe), CommandComplete, PortalSuspended,
                    // EmptyQueryResponse (the end of an Execute).
                    b'1' | b'2' | b'3' | b'T' | b'n' | b'C' | b's' | b'I' => answered += 1,
                    _ => {}
                }
            }
        }
        Expect::Sentinel(step) => {
            let from = run.answers.len();
            while next(conn, run, client, write).await? != b'Z' {}
            *group_failed = false;
            let token = format!("~c{client}-s{step}~");
            let got: Vec<&Answer> = run.answers[from..]
                .iter()
                .filter(|a| !matches!(a.tag, b'S' | b'N' | b'K' | b'A'))
                .collect();
            let tags: Vec<u8> = got.iter().map(|a| a.tag).collect();
            let row_ok = got
                .get(1)
                .is_some_and(|a| a.tag == b'D' && contains(&a.body, token.as_bytes()));
            if tags != b"TDCZ" || !row_ok {
                let shown: Vec<String> = got.iter().map(|a| show(a.tag, &a.body)).collect();
                return Err(Stop::Desync(
                    "the session's last query got another answer than its own",
                    format!("SELECT '{token}' was answered with [{}]", shown.join(", ")),
                ));
            }
        }
    }
    Ok(())
}

/// Reads one message, keeps it, and checks that what it carries is this client's.
async fn next(conn: &mut Conn, run: &mut Run, client: usize, write: usize) -> Result<u8, Stop> {
    let (tag, body) = conn.recv().await?;
    if matches!(tag, b'D' | b'd' | b'E') {
        if let Some(&(other, step)) = tokens(&body).iter().find(|(c, _)| *c != client) {
            run.problems.push(Problem {
                kind: Kind::CrossClient,
                signature: "an answer carrying another client's token".into(),
                detail: format!(
                    "client {client} got {} after its write {write}: it carries client {other}'s token of step {step}",
                    show(tag, &body)
                ),
                at_write: Some(write),
                foreign: Some((other, step)),
            });
        }
    }
    run.answers.push(Answer { write, tag, body });
    Ok(tag)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every token in a message: `~c<client>-s<step>~` or `#c<client>-s<step>#`.
fn tokens(body: &[u8]) -> Vec<(usize, u64)> {
    let mut found = Vec::new();
    let mut i = 0;
    while i + 1 < body.len() {
        let delimiter = body[i];
        if (delimiter == b'~' || delimiter == b'#') && body[i + 1] == b'c' {
            if let Some((client, step, len)) = token_at(&body[i + 2..], delimiter) {
                found.push((client, step));
                i += 2 + len;
                continue;
            }
        }
        i += 1;
    }
    found
}

/// `<client>-s<step><delimiter>` at the start of `rest`, and its length.
fn token_at(rest: &[u8], delimiter: u8) -> Option<(usize, u64, usize)> {
    let digits = |from: usize| {
        rest[from..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count()
    };
    let client_len = digits(0);
    if client_len == 0 || rest.get(client_len..client_len + 2)? != b"-s" {
        return None;
    }
    let step_at = client_len + 2;
    let step_len = digits(step_at);
    if step_len == 0 || *rest.get(step_at + step_len)? != delimiter {
        return None;
    }
    let client = std::str::from_utf8(&rest[..client_len])
        .ok()?
        .parse()
        .ok()?;
    let step = std::str::from_utf8(&rest[step_at..step_at + step_len])
        .ok()?
        .parse()
        .ok()?;
    Some((client, step, step_at + step_len + 1))
}

// ---------------------------------------------------------------------------------------
// Backend messages, for people

/// The fields of an ErrorResponse or NoticeResponse.
fn fields(body: &[u8]) -> BTreeMap<u8, String> {
    body.split(|b| *b == 0)
        .filter(|field| !field.is_empty())
        .map(|field| (field[0], String::from_utf8_lossy(&field[1..]).into_owned()))
        .collect()
}

fn is_fatal(body: &[u8]) -> bool {
    // V is the severity never translated; S, which may be, is there on every server.
    let f = fields(body);
    f.get(&b'V')
        .or_else(|| f.get(&b'S'))
        .is_some_and(|s| s == "FATAL" || s == "PANIC")
}

fn sqlstate(body: &[u8]) -> String {
    fields(body).remove(&b'C').unwrap_or_default()
}

/// The columns of a DataRow, as text where they are.
fn columns(body: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    if body.len() < 2 {
        return out;
    }
    let mut at = 2;
    while at + 4 <= body.len() {
        let len = i32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
        at += 4;
        if len < 0 {
            out.push("NULL".into());
            continue;
        }
        let end = (at + len as usize).min(body.len());
        let value = &body[at..end];
        out.push(match std::str::from_utf8(value) {
            Ok(text) if !text.chars().any(char::is_control) => format!("{text:?}"),
            _ => format!(
                "0x{}",
                value.iter().map(|b| format!("{b:02x}")).collect::<String>()
            ),
        });
        at = end;
    }
    out
}

fn cstr(body: &[u8]) -> String {
    let end = body.iter().position(|b| *b == 0).unwrap_or(body.len());
    String::from_utf8_lossy(&body[..end]).into_owned()
}

fn show(tag: u8, body: &[u8]) -> String {
    match tag {
        b'E' | b'N' => {
            let f = fields(body);
            let get = |k: u8| f.get(&k).cloned().unwrap_or_default();
            let name = if tag == b'E' {
                "ErrorResponse"
            } else {
                "NoticeResponse"
            };
            format!("{name}({} {}: {})", get(b'S'), get(b'C'), get(b'M'))
        }
        b'D' => format!("DataRow({})", columns(body).join(", ")),
        b'T' => {
            let mut names = Vec::new();
            let mut at = 2;
            while at < body.len() {
                let name = cstr(&body[at..]);
                at += name.len() + 1 + 18;
                names.push(name);
            }
            format!("RowDescription({})", names.join(", "))
        }
        b'C' => format!("CommandComplete({:?})", cstr(body)),
        b'Z' => format!(
            "ReadyForQuery({})",
            body.first().map_or('?', |b| *b as char)
        ),
        b'd' => format!("CopyData({:?})", String::from_utf8_lossy(body)),
        b'S' => {
            let name = cstr(body);
            let value = cstr(&body[(name.len() + 1).min(body.len())..]);
            format!("ParameterStatus({name}={value})")
        }
        b'1' => "ParseComplete".into(),
        b'2' => "BindComplete".into(),
        b'3' => "CloseComplete".into(),
        b'n' => "NoData".into(),
        b's' => "PortalSuspended".into(),
        b'I' => "EmptyQueryResponse".into(),
        b't' => "ParameterDescription".into(),
        b'G' => "CopyInResponse".into(),
        b'H' => "CopyOutResponse".into(),
        b'c' => "CopyDone".into(),
        b'K' => "BackendKeyData".into(),
        other => format!("{}({:?})", other as char, String::from_utf8_lossy(body)),
    }
}

/// A message in a failure's signature: its type, and for an error its SQLSTATE.
fn brief(tag: u8, body: &[u8]) -> String {
    match tag {
        b'E' => format!("ErrorResponse {}", sqlstate(body)),
        b'D' => "DataRow".into(),
        b'd' => "CopyData".into(),
        b'T' => "RowDescription".into(),
        b'C' => format!(
            "CommandComplete {}",
            cstr(body).split(' ').next().unwrap_or("")
        ),
        _ => show(tag, body),
    }
}

// ---------------------------------------------------------------------------------------
// Runs

async fn isolation(
    phase: Phase,
    target: &Target,
    config: &Config,
    until: Instant,
    report: &Arc<Mutex<Report>>,
) {
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let (target, report, seed) = (target.clone(), report.clone(), config.seed);
        tasks.push(tokio::spawn(async move {
            let mut step = 1;
            let mut session = 0;
            while Instant::now() < until && session < MAX_SESSIONS {
                let id = SessionId {
                    phase,
                    client,
                    session,
                    start_step: step,
                };
                let script = Script::generate(seed, id);
                step = script.next_step;
                lock(&report)
                    .registry
                    .entry((phase, client))
                    .or_default()
                    .push(id);
                let run = run_session(&target, &script, HANG).await;
                lock(&report).add(id, run.sent, run.answers.len(), run.problems);
                session += 1;
            }
        }));
    }
    for task in tasks {
        task.await.expect("a fuzzing client panicked");
    }
}

/// Each session once directly and once through a proxy (the modes take turns), each from
/// the same table contents, one session at a time; the answers are compared. A proxy that
/// failed a session is restarted, so that what it did to its pool is not blamed on the
/// sessions after it.
async fn differential(config: &Config, lab: &mut Lab, until: Instant, report: &Arc<Mutex<Report>>) {
    let mut steps = [1u64; CLIENTS];
    let mut k = 0u64;
    while Instant::now() < until && k < MAX_SESSIONS * CLIENTS as u64 {
        let client = (k % CLIENTS as u64) as usize;
        let id = SessionId {
            phase: Phase::Differential,
            client,
            session: k / CLIENTS as u64,
            start_step: steps[client],
        };
        let script = Script::generate(config.seed, id);
        steps[client] = script.next_step;
        let mode = id.proxy_mode();
        if !config.differential_modes.iter().any(|m| m == mode) {
            k += 1;
            continue;
        }
        let (direct, through, problems) = lab.both_ways(&script, mode, HANG).await;
        if !problems.is_empty() {
            lab.restart(mode).await;
        }
        lock(report).allowed += through.allowed as u64;
        lock(report).add(
            id,
            direct.sent + through.sent,
            direct.answers.len() + through.answers.len(),
            problems,
        );
        k += 1;
    }
}

/// One example of each failure a single session can show is shrunk: a difference, and a
/// hang, desync or close through the proxy if that session alone, run both ways, answers
/// differently. Stops at `until`.
async fn shrink_examples(
    config: &Config,
    lab: &mut Lab,
    until: Instant,
    report: &Arc<Mutex<Report>>,
) {
    let mut to_shrink: Vec<(usize, SessionId, Kind, String)> = lock(report)
        .groups
        .iter()
        .enumerate()
        .filter(|(_, g)| {
            matches!(
                g.kind,
                Kind::Difference | Kind::Hang | Kind::Desync | Kind::Closed
            )
        })
        .filter_map(|(i, g)| Some((i, g.example.id?, g.kind, g.signature.clone())))
        .collect();
    to_shrink.sort_by_key(|(_, _, kind, _)| *kind != Kind::Difference);
    for (i, id, kind, signature) in to_shrink {
        if Instant::now() >= until {
            break;
        }
        let script = Script::generate(config.seed, id);
        let mode = id.proxy_mode();
        let signature = if kind == Kind::Difference {
            signature
        } else {
            lab.restart(mode).await;
            let (_, _, problems) = lab.both_ways(&script, mode, Duration::from_secs(2)).await;
            if problems.iter().any(|p| p.kind == Kind::Fuzzer) {
                continue;
            }
            match problems.into_iter().find(|p| p.kind == Kind::Difference) {
                Some(difference) => difference.signature,
                None => continue,
            }
        };
        let (small, trials) = minimise(lab, &script, &signature, until).await;
        lock(report).groups[i].example.minimised = Some((signature, small, trials));
    }
}

/// What is compared: everything but ParameterStatus, BackendKeyData, notices and
/// notifications (which a pooler may send at other times), and errors by SQLSTATE only
/// (the proxy's own errors word things its way).
fn normalised(answers: &[Answer]) -> Vec<(Bytes, &Answer)> {
    answers
        .iter()
        .filter(|a| !matches!(a.tag, b'S' | b'K' | b'N' | b'A'))
        .map(|a| {
            let body = if a.tag == b'E' {
                Bytes::from(sqlstate(&a.body))
            } else {
                a.body.clone()
            };
            (body, a)
        })
        .collect()
}

/// How the proxied answers rejoin PostgreSQL's after an allowed difference.
enum Rejoin {
    /// At the next answer on both sides.
    Next,
    /// At the ReadyForQuery that ends the sync group on both sides.
    AtReady,
    /// Not in this session: the two went different ways (a transaction block opened on one
    /// side only), and the rest is not compared.
    Never,
}

/// A failed transaction where the proxy had to prepare a statement on its server connection:
/// "In a transaction that has already failed ... 25P02". The proxy answers 25P02, where
/// PostgreSQL gives the message's own error or answer, in a transaction PostgreSQL already
/// reported as failed (the last ReadyForQuery before it says `E`). The rest of that sync
/// group is skipped on both sides.
fn failed_transaction_difference(direct: &[(Bytes, &Answer)], at: usize, proxied: &Answer) -> bool {
    proxied.tag == b'E'
        && sqlstate(&proxied.body) == "25P02"
        && direct[..at]
            .iter()
            .rev()
            .find(|(_, answer)| answer.tag == b'Z')
            .is_some_and(|(_, answer)| answer.body.first() == Some(&b'E'))
}

/// A statement prepared again on another connection after the session changed its
/// `search_path` (the README: "A statement prepared again on another connection is analysed
/// there with the session's current settings"): in transaction mode the proxy may answer that
/// a table (42P01), function or operator (42883) or type (42704) does not exist, where
/// PostgreSQL, which resolved the names at the Parse, answers something else. The rest of
/// that sync group is skipped through the proxy.
fn reprepared_difference(script: &Script, mode: &str, proxied: &Answer) -> bool {
    let missing = proxied.tag == b'E'
        && matches!(
            sqlstate(&proxied.body).as_str(),
            "42P01" | "42883" | "42704"
        );
    mode == "transaction" && missing && sent_by(script, proxied.write, "SET search_path")
}

/// A statement prepared again on another connection inside the client's pipeline takes a
/// snapshot (the README: "a `BEGIN ISOLATION LEVEL ...` sent after a Bind or Describe of such
/// a statement with no Sync between them gets `25001`").
fn reprepared_snapshot_difference(script: &Script, mode: &str, proxied: &Answer) -> bool {
    mode == "transaction"
        && proxied.tag == b'E'
        && sqlstate(&proxied.body) == "25001"
        && sent_by(script, proxied.write, "ISOLATION LEVEL")
}

/// Whether a Query or Parse up to and including write `write` contains `text`.
fn sent_by(script: &Script, write: usize, text: &str) -> bool {
    script.writes[..=write.min(script.writes.len() - 1)]
        .iter()
        .flat_map(|w| &w.msgs)
        .any(|m| match m {
            Msg::Query(query) | Msg::Parse { query, .. } => query.contains(text),
            _ => false,
        })
}

/// Differences the README documents under "What a pooler cannot do", which are not
/// failures (and are counted as allowed). The generator sends nothing whose answer depends
/// on the server connection (pg_backend_pid(), temporary tables, SQL-level PREPARE, LISTEN,
/// WITH HOLD cursors, advisory locks), so these can show:
/// - transaction mode: "A setting changed in a transaction that then used ROLLBACK TO
///   SAVEPOINT is not followed". The row of the settings query (token, TimeZone,
///   search_path, statement_timeout) may then show other values than PostgreSQL's, once
///   the session has sent a ROLLBACK TO SAVEPOINT.
/// - [`failed_transaction_difference`].
fn allowed_difference(
    script: &Script,
    mode: &str,
    direct: &Answer,
    proxied: &Answer,
) -> Option<&'static str> {
    let (a, b) = (columns(&direct.body), columns(&proxied.body));
    let settings_row = direct.tag == b'D'
        && proxied.tag == b'D'
        && a.len() == 4
        && b.len() == 4
        && a[0] == b[0]
        && a[0].starts_with("\"~c");
    let rolled_back_to_savepoint = sent_by(script, direct.write, "ROLLBACK TO SAVEPOINT");
    (mode == "transaction" && settings_row && rolled_back_to_savepoint)
        .then_some("a setting changed in a transaction that used ROLLBACK TO SAVEPOINT")
}

struct Difference {
    text: String,
    signature: String,
    /// The write after which the first different answer came.
    write: Option<usize>,
}

/// The first answer that differs, but for the allowed differences, which are counted.
fn first_difference(
    script: &Script,
    mode: &str,
    direct: &Run,
    proxied: &mut Run,
) -> Option<Difference> {
    let (a, b) = (normalised(&direct.answers), normalised(&proxied.answers));
    let mut allowed = 0;
    let mut found = None;
    // Two cursors: after an allowed difference the two sides may have answered a different
    // number of messages until they meet again.
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let (x, y) = (a.get(i), b.get(j));
        if let (Some((xb, x)), Some((yb, y))) = (x, y) {
            if x.tag == y.tag && xb == yb {
                i += 1;
                j += 1;
                continue;
            }
            let rejoin = if allowed_difference(script, mode, x, y).is_some() {
                Some(Rejoin::Next)
            } else if failed_transaction_difference(&a, i, y)
                || reprepared_difference(script, mode, y)
            {
                Some(Rejoin::AtReady)
            } else if reprepared_snapshot_difference(script, mode, y) {
                Some(Rejoin::Never)
            } else {
                None
            };
            match rejoin {
                Some(Rejoin::Next) => {
                    allowed += 1;
                    i += 1;
                    j += 1;
                    continue;
                }
                Some(Rejoin::Never) => {
                    allowed += 1;
                    break;
                }
                Some(Rejoin::AtReady) => {
                    allowed += 1;
                    while a.get(i).is_some_and(|(_, answer)| answer.tag != b'Z') {
                        i += 1;
                    }
                    while b.get(j).is_some_and(|(_, answer)| answer.tag != b'Z') {
                        j += 1;
                    }
                    continue;
                }
                None => {}
            }
        }
        let side = |m: Option<&(Bytes, &Answer)>| {
            m.map_or("nothing".to_string(), |(_, answer)| {
                format!(
                    "{} (after write {})",
                    show(answer.tag, &answer.body),
                    answer.write
                )
            })
        };
        let short = |m: Option<&(Bytes, &Answer)>| {
            m.map_or("nothing".to_string(), |(_, answer)| {
                brief(answer.tag, &answer.body)
            })
        };
        let before: Vec<String> = a[i.saturating_sub(3)..i.min(a.len())]
            .iter()
            .map(|(_, answer)| show(answer.tag, &answer.body))
            .collect();
        found = Some(Difference {
            text: format!(
                "answer #{i} differs: PostgreSQL sent {}, the proxy {}; the answers before it: [{}]",
                side(x),
                side(y),
                before.join(", ")
            ),
            signature: format!("PostgreSQL: {} / proxy: {}", short(x), short(y)),
            write: x.or(y).map(|(_, answer)| answer.write),
        });
        break;
    }
    proxied.allowed = allowed;
    found
}

/// Shrinks a session that answers differently through the proxy, as long as PostgreSQL
/// still answers the smaller session as the fuzzer expects (so it stays well-formed) and
/// the proxy, started afresh for each try, still differs in the same way: drops runs of
/// writes (halves first), then single messages, then the cuts. Stops at `until` with what
/// it has, and says how many tries it took.
async fn minimise(
    lab: &mut Lab,
    script: &Script,
    signature: &str,
    until: Instant,
) -> (Script, usize) {
    // Short: a candidate that leaves PostgreSQL waiting is rejected quickly.
    let hang = Duration::from_secs(1);
    let mode = script.id.proxy_mode();
    let mut best = script.clone();
    let mut trials = 0;
    let mut still_fails = async |candidate: &Script| {
        trials += 1;
        lab.restart(mode).await;
        let (_, _, problems) = lab.both_ways(candidate, mode, hang).await;
        !problems.iter().any(|p| p.kind == Kind::Fuzzer)
            && problems
                .iter()
                .any(|p| p.kind == Kind::Difference && p.signature == signature)
    };
    let mut size = best.writes.len().div_ceil(2);
    while size > 0 && Instant::now() < until {
        let mut at = 0;
        while at < best.writes.len() && Instant::now() < until {
            let mut candidate = best.clone();
            let end = (at + size).min(candidate.writes.len());
            candidate.writes.drain(at..end);
            if !candidate.writes.is_empty()
                && avoids_unnamed_portal_crash(&candidate.writes)
                && still_fails(&candidate).await
            {
                best = candidate;
            } else {
                at += size;
            }
        }
        size /= 2;
    }
    for w in 0..best.writes.len() {
        let mut m = 0;
        while m < best.writes[w].msgs.len() && Instant::now() < until {
            match without_message(&best.writes[w], m) {
                Some(write) => {
                    let mut candidate = best.clone();
                    candidate.writes[w] = write;
                    if avoids_unnamed_portal_crash(&candidate.writes)
                        && still_fails(&candidate).await
                    {
                        best = candidate;
                    } else {
                        m += 1;
                    }
                }
                None => m += 1,
            }
        }
    }
    // Whole writes are simpler to read: try without the cuts.
    for w in 0..best.writes.len() {
        if !best.writes[w].cuts.is_empty() && Instant::now() < until {
            let mut candidate = best.clone();
            candidate.writes[w].cuts.clear();
            if still_fails(&candidate).await {
                best = candidate;
            }
        }
    }
    (best, trials)
}

/// `write` without its `m`-th message, what it expects to read adjusted: a Query or Sync
/// takes a ReadyForQuery with it, a message answered after a Flush one of the answers
/// awaited. None for what is not removed: a Terminate, or the sentinel's queries. Whether
/// the result is still well-formed is for PostgreSQL to tell.
fn without_message(write: &Write, m: usize) -> Option<Write> {
    if write
        .expect
        .iter()
        .any(|e| matches!(e, Expect::Sentinel(_)))
    {
        return None;
    }
    let mut out = write.clone();
    match out.msgs.remove(m) {
        Msg::Terminate => return None,
        Msg::Query(_) | Msg::Sync => {
            let ready = out
                .expect
                .iter()
                .rposition(|e| matches!(e, Expect::Ready))?;
            out.expect.remove(ready);
        }
        Msg::Parse { .. }
        | Msg::Bind { .. }
        | Msg::Describe { .. }
        | Msg::Execute { .. }
        | Msg::Close { .. } => {
            // After the write's last Sync or Query, before its Flush: one answer fewer.
            let after_the_last_sync = !write.msgs[m..]
                .iter()
                .any(|msg| matches!(msg, Msg::Query(_) | Msg::Sync));
            if let Some(Expect::Flushed(n)) = out.expect.last_mut() {
                if after_the_last_sync && *n > 0 {
                    *n -= 1;
                }
            }
        }
        _ => {}
    }
    let len = out.bytes().len();
    out.cuts.retain(|cut| *cut < len);
    Some(out)
}

/// Empties a client's table and puts its initial rows back. A lock wait longer than 10 s
/// means a transaction of an earlier session is still open.
async fn reset(admin: &Admin, client: usize) -> Result<(), String> {
    let t = table(client);
    admin
        .execute(&format!(
            "SET lock_timeout = '10s'; TRUNCATE {t}; \
             INSERT INTO {t} SELECT g, '#c{client}-s0#' FROM generate_series(1, {INITIAL_ROWS}) AS g"
        ))
        .await
        .map_err(|e| format!("reset {t}: {e}"))
}

/// Waits (up to 5 s) until no backend of the application role is busy or in a
/// transaction: the sessions that just ended are gone, and their server connections, if
/// pooled, idle.
async fn settle(admin: &Admin, user: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rows = admin
            .query(
                "SELECT pid, state, application_name, left(query, 120) FROM pg_stat_activity \
                 WHERE usename = $1 AND backend_type = 'client backend' \
                 AND state IS DISTINCT FROM 'idle'",
                &[&user],
            )
            .await
            .expect("read pg_stat_activity");
        if rows.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let busy: Vec<String> = rows
                .iter()
                .map(|r| {
                    format!(
                        "pid {} {:?} ({:?}): {:?}",
                        r.get::<_, i32>(0),
                        r.get::<_, Option<String>>(1),
                        r.get::<_, Option<String>>(2),
                        r.get::<_, Option<String>>(3)
                    )
                })
                .collect();
            return Err(format!(
                "5 s after its clients left, the role still has busy backends: {}",
                busy.join("; ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn abandoned_rows(admin: &Admin, client: usize) -> i64 {
    admin
        .query(
            &format!(
                "SELECT count(*) FROM {} WHERE note LIKE '%abandoned'",
                table(client)
            ),
            &[],
        )
        .await
        .expect("count abandoned rows")[0]
        .get(0)
}

/// `SWITCHYARD_FUZZ_REPLAY`: one session, directly and through a fresh proxy, both answers
/// printed in full.
async fn replay(spec: &str, config: &Config, lab: &mut Lab) {
    let id = SessionId::parse(spec).unwrap_or_else(|| {
        panic!("SWITCHYARD_FUZZ_REPLAY={spec}: expected <phase>:<client>:<session>:<step>")
    });
    let script = Script::generate(config.seed, id);
    eprintln!("replaying (seed {}):\n{script}", config.seed);
    let (direct, through, problems) = lab.both_ways(&script, id.proxy_mode(), HANG).await;
    for (run, name) in [
        (&direct, lab.targets.direct.name),
        (&through, lab.targets.proxy(id.proxy_mode()).name),
    ] {
        eprintln!("  answers {name}:");
        for answer in &run.answers {
            eprintln!(
                "    after write {}: {}",
                answer.write,
                show(answer.tag, &answer.body)
            );
        }
    }
    for problem in &problems {
        eprintln!("  {:?}: {}", problem.kind, problem.detail);
    }
    assert!(problems.is_empty(), "the replayed session {id} fails");
}

// ---------------------------------------------------------------------------------------
// The report

struct Example {
    phase: Phase,
    id: Option<SessionId>,
    detail: String,
    at_write: Option<usize>,
    foreign: Option<(usize, u64)>,
    /// The difference the session shows alone, run both ways, and the smallest session
    /// found that still shows it.
    minimised: Option<(String, Script, usize)>,
}

/// Failures of one kind and signature: how many, and the first.
struct Group {
    kind: Kind,
    signature: String,
    count: u64,
    example: Example,
}

#[derive(Default)]
struct Report {
    sessions: BTreeMap<Phase, u64>,
    sent: BTreeMap<Phase, u64>,
    received: BTreeMap<Phase, u64>,
    counts: BTreeMap<Kind, u64>,
    /// Differences allowed as documented limits ([`allowed_difference`]).
    allowed: u64,
    per_phase: BTreeMap<(Phase, Kind), u64>,
    /// In the order they first appeared.
    groups: Vec<Group>,
    /// Every session of the isolation runs, to find the one a foreign token came from.
    registry: HashMap<(Phase, usize), Vec<SessionId>>,
}

impl Report {
    fn add(&mut self, id: SessionId, sent: usize, received: usize, problems: Vec<Problem>) {
        *self.sessions.entry(id.phase).or_default() += 1;
        *self.sent.entry(id.phase).or_default() += sent as u64;
        *self.received.entry(id.phase).or_default() += received as u64;
        for problem in problems {
            self.count(id.phase, Some(id), problem);
        }
    }

    fn phase_problems(&mut self, phase: Phase, problems: Vec<Problem>) {
        for problem in problems {
            self.count(phase, None, problem);
        }
    }

    fn count(&mut self, phase: Phase, id: Option<SessionId>, mut problem: Problem) {
        // Whatever PostgreSQL itself does wrong in the direct run is the fuzzer's error.
        if phase == Phase::Direct && !matches!(problem.kind, Kind::ServerCrash | Kind::Fuzzer) {
            problem.signature = format!("{:?}: {}", problem.kind, problem.signature);
            problem.kind = Kind::Fuzzer;
        }
        *self.counts.entry(problem.kind).or_default() += 1;
        *self.per_phase.entry((phase, problem.kind)).or_default() += 1;
        if let Some(group) = self
            .groups
            .iter_mut()
            .find(|g| g.kind == problem.kind && g.signature == problem.signature)
        {
            group.count += 1;
            return;
        }
        let distinct = self
            .groups
            .iter()
            .filter(|g| g.kind == problem.kind)
            .count();
        let signature = if distinct < SIGNATURES {
            problem.signature
        } else {
            // Too many kinds of the same failure: the rest are counted together.
            "(others)".to_string()
        };
        if let Some(group) = self
            .groups
            .iter_mut()
            .find(|g| g.kind == problem.kind && g.signature == signature)
        {
            group.count += 1;
            return;
        }
        self.groups.push(Group {
            kind: problem.kind,
            signature,
            count: 1,
            example: Example {
                phase,
                id,
                detail: problem.detail,
                at_write: problem.at_write,
                foreign: problem.foreign,
                minimised: None,
            },
        });
    }

    /// The session of `client` in `phase` that sent `step`.
    fn culprit(&self, phase: Phase, client: usize, step: u64) -> Option<SessionId> {
        self.registry
            .get(&(phase, client))?
            .iter()
            .rev()
            .find(|id| id.start_step <= step)
            .copied()
    }

    fn summary(&self, config: &Config) -> String {
        let mut out = format!(
            "proxy_fuzz summary (seed {}, {} s):\n",
            config.seed, config.secs
        );
        for phase in Phase::ALL {
            let get = |map: &BTreeMap<Phase, u64>| map.get(&phase).copied().unwrap_or(0);
            let kinds: Vec<String> = self
                .per_phase
                .iter()
                .filter(|((p, _), _)| *p == phase)
                .map(|((_, kind), n)| format!("{n} {}", kind.name()))
                .collect();
            let what = if phase == Phase::Differential {
                "sessions, each directly and through a proxy"
            } else {
                "sessions"
            };
            out.push_str(&format!(
                "  {:<12} {} {what}, {} messages sent, {} received; {}\n",
                phase.name(),
                get(&self.sessions),
                get(&self.sent),
                get(&self.received),
                if kinds.is_empty() {
                    "no failures".to_string()
                } else {
                    kinds.join(", ")
                }
            ));
        }
        let total = |kind: Kind| self.counts.get(&kind).copied().unwrap_or(0);
        out.push_str(&format!(
            "  totals: {} sessions, {} messages sent, {} cross-client answers, {} hangs, \
             {} differences, {} other failures\n",
            self.sessions.values().sum::<u64>(),
            self.sent.values().sum::<u64>(),
            total(Kind::CrossClient),
            total(Kind::Hang),
            total(Kind::Difference),
            self.counts.values().sum::<u64>()
                - total(Kind::CrossClient)
                - total(Kind::Hang)
                - total(Kind::Difference),
        ));
        if self.allowed > 0 {
            out.push_str(&format!(
                "  {} differences allowed as limits the README documents (not failures)\n",
                self.allowed
            ));
        }
        let mut kinds: Vec<Kind> = self.groups.iter().map(|g| g.kind).collect();
        kinds.sort();
        kinds.dedup();
        for kind in kinds {
            let groups: Vec<&Group> = self.groups.iter().filter(|g| g.kind == kind).collect();
            out.push_str(&format!(
                "\n== {} {}, {} distinct; one example of each:\n",
                self.counts[&kind],
                kind.name(),
                groups.len()
            ));
            for group in groups {
                out.push_str(&self.group_text(config, group));
            }
        }
        out
    }

    fn group_text(&self, config: &Config, group: &Group) -> String {
        let example = &group.example;
        let mut out = format!(
            "\n  -- {} x {}\n  [{}] {}\n",
            group.count,
            group.signature,
            example.phase.name(),
            example.detail
        );
        let Some(id) = example.id else {
            return out;
        };
        out.push_str(&format!(
            "    replay: SWITCHYARD_FUZZ_SEED={} SWITCHYARD_FUZZ_REPLAY={id}\n",
            config.seed
        ));
        let script = Script::generate(config.seed, id);
        match &example.minimised {
            Some((difference, small, trials)) => {
                if group.kind != Kind::Difference {
                    out.push_str(&format!(
                        "    alone, run directly and through the proxy, the session differs: \
                         {difference}\n"
                    ));
                }
                out.push_str(&format!(
                    "    shrunk from {} writes ({} messages) to {} ({}) in {trials} tries, \
                     which still differs the same way:\n",
                    script.writes.len(),
                    script.message_count(),
                    small.writes.len(),
                    small.message_count()
                ));
                out.push_str(&small.render(None));
            }
            None => out.push_str(&script.render(example.at_write)),
        }
        if let Some((client, step)) = example.foreign {
            match self.culprit(example.phase, client, step) {
                Some(culprit) => {
                    let script = Script::generate(config.seed, culprit);
                    out.push_str(&format!(
                        "    the answer belongs to this session of client {client} (step {step}):\n"
                    ));
                    out.push_str(&script.render(script.write_of_step(client, step)));
                }
                None => out.push_str(&format!(
                    "    (no session of client {client} sent step {step})\n"
                )),
            }
        }
        out
    }
}

/// `SWITCHYARD_FUZZ_CACHE`: the proxies run with the read cache, and the sessions read with
/// repeating texts too.
fn cache_mode() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SWITCHYARD_FUZZ_CACHE").is_some())
}
