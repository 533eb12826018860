//! AWS's DynamoDB Local (`scripts/install-deps.sh` installs it into `.deps/dynamodb`), in
//! memory, on a free 127.0.0.1 port, through the launcher that keeps it on loopback and its
//! telemetry off. It dies with the test process.
//!
//! It keeps tables per access key and region: every process of a test uses [`ENV`].

#![allow(dead_code)]

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::servers::{free_port, spawn_kept, stop_kept};

/// The credentials and region every process of the tests uses with DynamoDB Local; no
/// instance metadata lookups (nothing leaves the machine).
pub const ENV: [(&str, &str); 5] = [
    ("AWS_ACCESS_KEY_ID", "switchyardtest"),
    ("AWS_SECRET_ACCESS_KEY", "switchyardtest"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_CONFIG_FILE", "/dev/null"),
];

/// The table the tests' plans use.
pub const TABLE: &str = "switchyard_state";

pub struct DynamoDb {
    pub port: u16,
    pid: u32,
}

/// One DynamoDB Local for the whole test process (it takes seconds to start); each test's
/// migration has its own name, so its own items.
pub fn shared() -> &'static DynamoDb {
    static SHARED: OnceLock<DynamoDb> = OnceLock::new();
    SHARED.get_or_init(DynamoDb::start)
}

impl DynamoDb {
    pub fn start() -> DynamoDb {
        let deps = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".deps/dynamodb");
        let local = deps.join("local");
        assert!(
            deps.join("classes/Loopback.class").exists(),
            "DynamoDB Local is not installed: run scripts/install-deps.sh"
        );
        let port = free_port();
        let mut command = Command::new("java");
        command
            .arg("-Xmx256m")
            .arg(format!(
                "-Djava.library.path={}",
                local.join("DynamoDBLocal_lib").display()
            ))
            .arg("-cp")
            .arg(format!(
                "{}:{}",
                local.join("DynamoDBLocal.jar").display(),
                deps.join("classes").display()
            ))
            .args(["Loopback", "-inMemory", "-port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let pid = spawn_kept(command).expect("start DynamoDB Local (java)");
        let db = DynamoDb { port, pid };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "DynamoDB Local did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        db
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The plan's `[state]` for this server, with `lease`.
    pub fn state_section(&self, lease: &str) -> String {
        format!(
            "[state]\nbackend = \"dynamodb\"\ntable = \"{TABLE}\"\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\nlease = \"{lease}\"\n",
            self.url()
        )
    }

    /// SIGSTOP: it stops answering, connections stay open.
    pub fn freeze(&self) {
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGSTOP) };
    }

    pub fn thaw(&self) {
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGCONT) };
    }

    pub fn kill(&self) {
        stop_kept(self.pid, libc::SIGKILL);
    }
}
