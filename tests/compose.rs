//! The plan docker-compose.yml mounts is loaded with switchyard's own plan loader, with the
//! environment the compose file gives the container, so the two cannot drift apart.

use std::path::Path;

use switchyard::plan::Plan;

/// `KEY: value` lines under the `switchyard` service's `environment:`.
fn compose_environment(compose: &str) -> Vec<(String, String)> {
    let service = compose
        .split("\n  switchyard:\n")
        .nth(1)
        .expect("a switchyard service");
    let env = service
        .split("    environment:\n")
        .nth(1)
        .expect("its environment");
    env.lines()
        .take_while(|line| line.starts_with("      "))
        .filter_map(|line| line.trim().split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn compose_plan_loads_and_points_at_the_compose_services() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let compose =
        std::fs::read_to_string(root.join("docker-compose.yml")).expect("read docker-compose.yml");
    let mount = compose
        .lines()
        .find_map(|line| {
            line.trim()
                .strip_prefix("- ./plans/")
                .and_then(|rest| rest.split(':').next())
        })
        .expect("docker-compose.yml mounts a plan from ./plans");
    for (key, value) in compose_environment(&compose) {
        // This test binary has one test: nothing else reads the environment concurrently.
        std::env::set_var(key, value);
    }
    let plan = Plan::load(&root.join("plans").join(mount)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plan.source.url.host(), "source");
    assert_eq!(plan.target.url.host(), "target");
    assert!(compose.contains("wal_level=logical"));
    // The shared state in the compose file's DynamoDB, which it runs.
    assert_eq!(plan.state.backend, switchyard::plan::StateBackend::Dynamodb);
    let endpoint = plan
        .state
        .endpoint_url
        .as_ref()
        .expect("an endpoint")
        .0
        .clone();
    assert!(endpoint.starts_with("http://dynamodb:"), "{endpoint}");
    assert!(compose.contains("\n  dynamodb:\n") && compose.contains("\n  redis:\n"));
    assert!(compose.contains(&format!("POSTGRES_DB: {}", plan.source.url.dbname())));

    // plans/example.toml documents every key with its default: it loads, and its values are
    // the defaults.
    let example = Plan::load(&root.join("plans/example.toml")).unwrap_or_else(|e| panic!("{e}"));
    let defaults = switchyard::plan::SyncSettings::default();
    assert_eq!(example.sync.max_lag_bytes, defaults.max_lag_bytes);
    assert_eq!(
        example.sync.retained_wal_warn_bytes,
        defaults.retained_wal_warn_bytes
    );
    assert_eq!(example.sync.poll_interval, defaults.poll_interval);
    assert_eq!(example.sync.copy_workers, defaults.copy_workers);
    assert_eq!(example.sync.tables, defaults.tables);
    assert_eq!(example.state_path(), Path::new(".switchyard/shop.json"));
}
