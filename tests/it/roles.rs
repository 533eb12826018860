//! Roles, memberships, grants, password verifiers and extensions come along with the schema.

use crate::common::{self, except_all, show, text, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_grants_and_extensions_are_copied() {
    let _settings = common::target_settings_lock().await;
    let db = TestDb::new("roles_copy").await;
    let source = db.source_client().await;
    source
        .batch_execute(
            "CREATE EXTENSION citext;
             CREATE SCHEMA roles_copy_ext;
             CREATE EXTENSION hstore WITH SCHEMA roles_copy_ext;
             CREATE ROLE roles_copy_owner NOLOGIN;
             CREATE ROLE roles_copy_readers NOLOGIN;
             CREATE ROLE roles_copy_app LOGIN PASSWORD 'app-secret' IN ROLE roles_copy_readers;
             CREATE ROLE roles_copy_dev LOGIN IN ROLE roles_copy_owner;
             CREATE TABLE accounts (id int PRIMARY KEY, email citext NOT NULL);
             ALTER TABLE accounts OWNER TO roles_copy_owner;
             GRANT SELECT ON accounts TO roles_copy_readers;
             GRANT INSERT, UPDATE ON accounts TO roles_copy_app;
             INSERT INTO accounts SELECT i, 'User' || i || '@Example.com' FROM generate_series(1, 500) AS i;",
        )
        .await
        .unwrap();

    let output = db.switchyard(&["plan", "--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let to_create: Vec<&str> = report["roles_to_create"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for role in ["roles_copy_owner", "roles_copy_readers", "roles_copy_app"] {
        assert!(to_create.contains(&role), "{role} not in {to_create:?}");
    }
    assert_eq!(
        report["extensions_to_create"],
        serde_json::json!(["citext", "hstore"])
    );
    let unfenceable = report["unfenceable_roles"].as_array().unwrap();
    let dev = unfenceable
        .iter()
        .find(|r| r["role"] == "roles_copy_dev")
        .unwrap_or_else(|| panic!("roles_copy_dev not listed: {unfenceable:?}"));
    assert!(
        dev["reasons"][0]
            .as_str()
            .unwrap()
            .contains("roles_copy_owner"),
        "{dev}"
    );
    assert!(
        !unfenceable.iter().any(|r| r["role"] == "roles_copy_app"),
        "{unfenceable:?}"
    );

    // This migration also sets the target's table-copy parallelism (the native copy's
    // setting); abort puts it back.
    db.write_plan("copy = \"native\"\ncopy_workers = 3\n");
    let output = db.switchyard(&["sync", "--wait", "--timeout", "60s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));

    let target = db.target_client().await;
    let workers = show(&target, "max_sync_workers_per_subscription").await;
    assert_eq!(workers, "3");
    let checks = target
        .query_one(
            "SELECT (SELECT tableowner::text FROM pg_tables WHERE tablename = 'accounts'),
                    has_table_privilege('roles_copy_app', 'public.accounts', 'INSERT'),
                    has_table_privilege('roles_copy_app', 'public.accounts', 'SELECT'),
                    has_table_privilege('roles_copy_app', 'public.accounts', 'DELETE'),
                    pg_has_role('roles_copy_app', 'roles_copy_readers', 'MEMBER'),
                    EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citext')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(checks.get::<_, String>(0), "roles_copy_owner");
    assert!(checks.get::<_, bool>(1), "INSERT grant missing");
    assert!(
        checks.get::<_, bool>(2),
        "SELECT through membership missing"
    );
    assert!(!checks.get::<_, bool>(3), "DELETE was never granted");
    assert!(checks.get::<_, bool>(4), "membership missing");
    assert!(checks.get::<_, bool>(5), "extension missing");

    // The password verifier came along: the application logs in to the target unchanged.
    let app_url = format!(
        "postgres://roles_copy_app:app-secret@127.0.0.1:{}/{}",
        db.target.port, db.name
    );
    let app = common::connect(&app_url).await;
    let n: i64 = app
        .query_one(
            "SELECT count(*) FROM accounts WHERE email = 'user7@example.com'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "citext comparison on the target");

    db.wait_caught_up(std::time::Duration::from_secs(30)).await;
    let (a, b) = except_all(&source, &target, "accounts").await;
    assert!(a.is_empty() && b.is_empty());

    let output = db.switchyard(&["abort", "--drop-target-data"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let workers = show(&target, "max_sync_workers_per_subscription").await;
    assert_eq!(workers, "4", "abort restores the target's setting");
    let roles: i64 = target
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'roles\\_copy\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        roles, 0,
        "abort --drop-target-data leaves the roles it created"
    );
    // The extensions sync created go too, and so does the schema it made for one of them;
    // `public`, which was there before, stays.
    let left = target
        .query_one(
            "SELECT (SELECT count(*) FROM pg_extension WHERE extname IN ('citext', 'hstore')),
                    (SELECT count(*) FROM pg_namespace WHERE nspname = 'roles_copy_ext'),
                    (SELECT count(*) FROM pg_namespace WHERE nspname = 'public')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(left.get::<_, i64>(0), 0, "extensions left on the target");
    assert_eq!(
        left.get::<_, i64>(1),
        0,
        "extension schema left on the target"
    );
    assert_eq!(left.get::<_, i64>(2), 1, "public was not sync's to drop");
}
