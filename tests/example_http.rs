//! The axum example over real HTTP: notes for many tenants land on their shards.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use common::{notes_of, Shards};
use shard_router::map::MapLoader;
use shard_router::{Migrations, TenantId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 request on a fresh connection; returns (status, body).
async fn http(addr: SocketAddr, method: &str, tenant: Option<&str>, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let tenant_header = tenant
        .map(|t| format!("x-tenant-id: {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} /notes HTTP/1.1\r\nhost: localhost\r\n{tenant_header}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

#[tokio::test]
async fn notes_api_over_http_routes_each_tenant_to_its_shard() {
    let shards = Shards::create(2).await;
    let toml = common::map_toml(1, &shards, "[tenants]\nacme = \"b\"\n");
    let dir = std::env::temp_dir().join(format!("example-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let map_path = dir.join("shard-map.toml");
    std::fs::write(&map_path, &toml).unwrap();
    let map = MapLoader::without_env().load_str(&toml).unwrap();
    // As the quickstart does: the schema comes from `shardctl migrate`, not the app.
    let migrations =
        Migrations::load(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/notes")).unwrap();
    for report in shard_router::migrate::migrate(&map, &migrations, |_, _| {}).await {
        report.outcome.unwrap();
    }

    let addr: SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let _server = common::Server(
        Command::new(common::example_binary("axum_app"))
            .args([
                "--map",
                map_path.to_str().unwrap(),
                "--listen",
                &addr.to_string(),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Wait until it accepts connections (it creates the schema first).
    let mut ready = false;
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(ready, "the example never listened on {addr}");

    let tenants: Vec<String> = (0..12)
        .map(|i| format!("org-{i}"))
        .chain(["acme".into()])
        .collect();
    for tenant in &tenants {
        for n in 0..2 {
            let (status, body) = http(
                addr,
                "POST",
                Some(tenant),
                &format!("{{\"body\":\"note {n} of {tenant}\"}}"),
            )
            .await;
            assert_eq!(status, 201, "{body}");
            let note: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(uuid::Uuid::parse_str(note["id"].as_str().unwrap()).is_ok());
            assert_eq!(note["body"], format!("note {n} of {tenant}"));
        }
    }
    for tenant in &tenants {
        let (status, body) = http(addr, "GET", Some(tenant), "").await;
        assert_eq!(status, 200);
        let notes: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        assert_eq!(notes.len(), 2, "{tenant} sees only its own notes");
        assert!(notes
            .iter()
            .all(|n| n["body"].as_str().unwrap().ends_with(tenant.as_str())));

        let located = map.locate(&TenantId::new(tenant).unwrap()).shard.get();
        for i in 0..2 {
            let expected = if i == located { 2 } else { 0 };
            assert_eq!(
                notes_of(&shards.url(i), tenant).await,
                expected,
                "{tenant}, shard {i}"
            );
        }
    }

    let (status, body) = http(addr, "GET", None, "").await;
    assert_eq!(status, 400);
    assert!(body.contains("missing_tenant"));
    let (status, _) = http(addr, "POST", Some("acme"), "{not json").await;
    assert_eq!(status, 400);
}
