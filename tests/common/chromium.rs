//! Debian's Chromium, headless: an HTML page as a browser parses it (`--dump-dom`), for the
//! tests that check a report's page. It reads the one local file; the flags keep it off the
//! network as far as they can (no updates, sync or background requests, host names resolve to
//! nothing but localhost). `scripts/install-deps.sh` installs it.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const CHROMIUM: &str = "/usr/bin/chromium";
const TIMEOUT: Duration = Duration::from_secs(60);

/// The DOM of `html_file` once Chromium has loaded it, serialised back to HTML (Chromium's
/// stdout). Panics, with Chromium's stderr, if it fails or takes longer than a minute.
pub fn dump_dom(html_file: &Path) -> String {
    let path = std::fs::canonicalize(html_file)
        .unwrap_or_else(|e| panic!("chromium: {}: {e}", html_file.display()));
    let url = file_url(&path);
    // A profile of its own, so that parallel runs share nothing; removed when dropped.
    let profile = tempfile::Builder::new()
        .prefix("switchyard-chromium-")
        .tempdir_in(std::env::temp_dir())
        .expect("chromium profile directory");
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            "--disable-domain-reliability",
            "--disable-breakpad",
            "--disable-crash-reporter",
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(&url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own: on a timeout, its renderer and helper processes go with it.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("start {CHROMIUM} (scripts/install-deps.sh installs it): {e}"));
    let pid = child.id() as libc::pid_t;
    let reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = reader(Box::new(child.stdout.take().expect("stdout")));
    let stderr = reader(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Helpers left behind by a Chromium that exited would keep the pipes open.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let (stdout, stderr) = (
        stdout.join().expect("chromium stdout"),
        stderr.join().expect("chromium stderr"),
    );
    match status {
        Some(status) if status.success() && !stdout.trim().is_empty() => stdout,
        Some(status) => panic!(
            "chromium --dump-dom {url}: {status}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        ),
        None => panic!(
            "chromium --dump-dom {url}: no answer within {TIMEOUT:?}, killed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        ),
    }
}

/// `file://` and the absolute path, with what a URL cannot hold as is percent-encoded.
fn file_url(path: &Path) -> String {
    let mut url = String::from("file://");
    for &byte in path.as_os_str().as_encoded_bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => {
                url.push(byte as char)
            }
            _ => url.push_str(&format!("%{byte:02X}")),
        }
    }
    url
}
