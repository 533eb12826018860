//! A source that only accepts TLS: the coordinator, pg_dump/pg_restore and the target's
//! replication connection all use it with `sslmode=require`.

use std::time::Duration;

use crate::common::servers::{Cluster, Flavor};
use crate::common::{self, except_all, text, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_from_a_tls_only_source() {
    let source: &'static Cluster = Box::leak(Box::new(Cluster::start_tls_only(Flavor::Source15)));
    let name = "tls_only";
    // The harness's own client connects without TLS; the TLS-only source refuses it, so this
    // test sets up its database through the switchyard code path's sslmode instead.
    let admin_url = format!("{}?sslmode=require", source.url("postgres"));
    let admin = connect_tls(&admin_url).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let target_admin = common::connect(&common::target().url("postgres")).await;
    target_admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .unwrap();
    target_admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let db = TestDb {
        name: name.into(),
        dir: tempfile::tempdir().unwrap(),
        source,
        target: common::target(),
        state: String::new(),
    };
    let src = connect_tls(&format!("{}?sslmode=require", source.url(name))).await;
    src.batch_execute(&common::testdata_schema()).await.unwrap();
    src.batch_execute(&common::testdata_rows(300))
        .await
        .unwrap();

    // Without TLS the source says no, and the error says why.
    let plain = db.plan_text("").replace(
        &source.url(name),
        &format!("{}?sslmode=disable", source.url(name)),
    );
    std::fs::write(db.plan_path(), plain).unwrap();
    let output = db.switchyard(&["plan"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no encryption"),
        "{}",
        text(&output)
    );

    let tls = db.plan_text("").replace(
        &source.url(name),
        &format!("{}?sslmode=require", source.url(name)),
    );
    std::fs::write(db.plan_path(), tls).unwrap();
    let output = db.switchyard(&["sync", "--wait", "--timeout", "60s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));

    let encrypted: bool = src
        .query_one("SELECT coalesce(bool_and(s.ssl), false) FROM pg_stat_replication r JOIN pg_stat_ssl s ON s.pid = r.pid", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        encrypted,
        "the target's replication connection is not encrypted"
    );
    let target = db.target_client().await;
    common::wait_caught_up(&src, &format!("switchyard_{name}"), Duration::from_secs(30)).await;
    for table in ["customers", "orders", "order_items"] {
        let (a, b) = except_all(&src, &target, table).await;
        assert!(a.is_empty() && b.is_empty(), "{table}");
    }
    // The proxy in front of the TLS-only source: TLS to the server (the URL's sslmode) and,
    // with a certificate of its own, TLS to its clients.
    let cert_dir = db.dir.path();
    crate::common::servers::self_signed_cert(
        &cert_dir.join("proxy.key"),
        &cert_dir.join("proxy.crt"),
    );
    let extra = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"",
        cert_dir.join("proxy.crt").display(),
        cert_dir.join("proxy.key").display()
    );
    let plan = db.plan_text("").replace(
        &source.url(name),
        &format!("{}?sslmode=require", source.url(name)),
    );
    let proxy = crate::proxy::Proxy::start_with(&db, &src, &plan, "transaction", 2, &extra).await;
    let (client, connection) = tokio_postgres::connect(
        &format!("{}?sslmode=require", proxy.url()),
        switchyard::pg::tls::connector().unwrap(),
    )
    .await
    .expect("TLS through the proxy");
    tokio::spawn(connection);
    let n: i64 = client
        .query_one("SELECT count(*) FROM customers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 300);
    let server_side: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        server_side,
        "the proxy's server connection is not encrypted"
    );
    drop(proxy);

    let output = db.switchyard(&["abort", "--drop-target-data"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
}

async fn connect_tls(url: &str) -> tokio_postgres::Client {
    let plan_text = format!("name = \"x\"\n[source]\nurl = \"{url}\"\n[target]\nurl = \"{url}\"\n");
    let plan = switchyard::plan::Plan::parse(&plan_text, std::path::Path::new("tls.toml")).unwrap();
    let server = switchyard::pg::Server::connect(switchyard::pg::Side::Source, &plan.source)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    server.client
}
