//! `shardctl` as operators run it: exit codes, messages, JSON.

use std::path::PathBuf;
use std::process::{Command, Output};

fn shardctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args(args)
        .env_remove("SHARD_ROUTER__SHARDS__A__URL")
        .output()
        .unwrap()
}

fn write_map(name: &str, toml: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shardctl-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, toml).unwrap();
    path
}

const GOOD: &str = "version = 7\n\
    [shards.a]\nurl = \"postgres://app:secret@db-a/app\"\n\
    [shards.b]\nurl = \"postgres://app@db-b/app\"\n\
    [tenants]\nacme = \"b\"\n\
    [moves.globex]\nfrom = \"a\"\nto = \"b\"\nphase = \"reversed\"\n";

#[test]
fn validate_accepts_the_sample_map() {
    let out = shardctl(&[
        "map",
        "validate",
        concat!(env!("CARGO_MANIFEST_DIR"), "/shard-map.toml"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok:"));
}

#[test]
fn validate_prints_each_problem_on_its_own_line_and_exits_1() {
    let path = write_map(
        "bad.toml",
        "version = 0\n[shards.a]\nurl = \"postgres://h/a\"\npool = { max_size = 0 }\n[tenants]\nacme = \"zz\"\n",
    );
    let out = shardctl(&["map", "validate", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(lines.iter().any(|l| l.starts_with("error: version:")));
    assert!(lines
        .iter()
        .any(|l| l.starts_with("error: shards.a.pool.max_size:")));
    assert!(lines.iter().any(|l| l.starts_with("error: tenants.acme:")));

    let out = shardctl(&["--json", "map", "validate", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["valid"], false);
    assert_eq!(json["problems"].as_array().unwrap().len(), 3);
}

#[test]
fn validate_reports_unreadable_and_unparsable_files() {
    let out = shardctl(&["map", "validate", "/nonexistent/shard-map.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/shard-map.toml"));

    let path = write_map("broken.toml", "version = 1\n[shards.a\n");
    let out = shardctl(&["map", "validate", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));
}

#[test]
fn locate_prints_shard_and_json_with_reason() {
    let path = write_map("good.toml", GOOD);
    let map = path.to_str().unwrap();

    let out = shardctl(&["tenant", "locate", "acme", "--map", map]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "b\n");

    let out = shardctl(&["--json", "tenant", "locate", "acme", "--map", map]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"tenant": "acme", "shard": "b", "reason": "pin", "map_version": 7})
    );

    let out = shardctl(&["--json", "tenant", "locate", "someone-new", "--map", map]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["reason"], "ring");

    let out = shardctl(&["--json", "tenant", "locate", "globex", "--map", map]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["reason"], "move");
    assert_eq!(json["shard"], "b");
    assert_eq!(json["move"]["phase"], "reversed");
}

#[test]
fn locate_refuses_an_invalid_tenant_id() {
    let path = write_map("good2.toml", GOOD);
    let out = shardctl(&[
        "tenant",
        "locate",
        "acme;drop",
        "--map",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden character"));
}

#[test]
fn show_redacts_passwords_and_env_overrides_apply() {
    let path = write_map("good3.toml", GOOD);
    let out = Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args(["--json", "map", "show", path.to_str().unwrap()])
        .env(
            "SHARD_ROUTER__SHARDS__A__URL",
            "postgres://ops:hunter2@db-a2/app",
        )
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.contains("hunter2") && !text.contains("secret"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["shards"][0]["url"], "postgres://ops:***@db-a2/app");
    assert_eq!(json["tenants"]["acme"], "b");
}

#[test]
fn no_output_surface_shows_a_password_in_any_url_form_or_parse_error() {
    let map = "version = 3\n\
        [shards.a]\nurl = \"host=db-a user=app password=k3yvalue dbname=app\"\n\
        [shards.b]\nurl = \"postgres://app@db-b/app?password=qu3ry&sslmode=prefer\"\n";
    let path = write_map("secrets.toml", map);
    for args in [
        vec!["map", "show", path.to_str().unwrap()],
        vec!["--json", "map", "show", path.to_str().unwrap()],
        vec!["map", "validate", path.to_str().unwrap()],
        vec![
            "--json",
            "tenant",
            "locate",
            "acme",
            "--map",
            path.to_str().unwrap(),
        ],
    ] {
        let out = shardctl(&args);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{args:?}: {all}");
        assert!(
            !all.contains("k3yvalue") && !all.contains("qu3ry"),
            "{args:?}: {all}"
        );
    }
    // A map that fails to parse: the error names the line, never echoes it.
    let broken = write_map(
        "broken.toml",
        "version = 3\n[shards.a]\nurl = \"postgres://app:l1nesecret@db/a\" trailing\n",
    );
    let out = shardctl(&["map", "validate", broken.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(!err.contains("l1nesecret"), "{err}");
    assert!(err.contains("line 3"), "{err}");
}
