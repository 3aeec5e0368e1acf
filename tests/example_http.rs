//! The axum example over real HTTP: notes for many tenants land on their shards.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use common::{notes_of, Shards};
use shard_router::map::MapLoader;
use shard_router::{Migrations, TenantId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A loopback address nothing listens on yet.
fn free_addr() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap()
}

/// Starts the example with `args` (its `--listen` among them) and waits until
/// it accepts connections on `addr`.
async fn start_example(addr: SocketAddr, args: &[&str]) -> common::Server {
    let server = common::Server(
        Command::new(common::example_binary("axum_app"))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            return server;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the example never listened on {addr}");
}

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

    let addr: SocketAddr = free_addr();
    let admin: SocketAddr = free_addr();
    // Wait until it accepts connections (it creates the schema first).
    let _server = start_example(
        addr,
        &[
            "--map",
            map_path.to_str().unwrap(),
            "--listen",
            &addr.to_string(),
            "--admin-listen",
            &admin.to_string(),
        ],
    )
    .await;

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

    // The admin listener serves Prometheus metrics: 13 tenants made 2 POSTs
    // and 1 GET each, a statement apiece.
    let mut stream = TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let metrics = response.split_once("\r\n\r\n").unwrap().1;
    let ok: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("shard_router_statements_total{") && l.contains("outcome=\"ok\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(ok, 13 * 3, "{metrics}");
    assert!(metrics.contains("shard_router_map_version 1"), "{metrics}");

    // The same routes with the layer around the router (`--around-router`):
    // the same answers, the same shards.
    let around: SocketAddr = free_addr();
    let _around_server = start_example(
        around,
        &[
            "--around-router",
            "--map",
            map_path.to_str().unwrap(),
            "--listen",
            &around.to_string(),
            "--admin-listen",
            "127.0.0.1:0",
        ],
    )
    .await;
    let (status, body) = http(
        around,
        "POST",
        Some("acme"),
        "{\"body\":\"note 2 of acme\"}",
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = http(around, "GET", Some("acme"), "").await;
    assert_eq!(status, 200);
    let notes: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(notes.len(), 3, "{body}");
    assert_eq!(
        notes_of(&shards.url(1), "acme").await,
        3,
        "acme is pinned to b"
    );
    let (status, body) = http(around, "GET", None, "").await;
    assert_eq!(status, 400);
    assert!(body.contains("missing_tenant"));
}

/// The example app, following a control database, moves a tenant while
/// clients POST and GET as fast as they can: the move completes and the target
/// holds exactly the acknowledged notes, once each (`created_at DEFAULT now()`
/// included: verify compares whole rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_of_the_example_moves_while_clients_post_and_get_at_full_speed() {
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let shards = Shards::create(2).await;
    let control_db = Shards::create(1).await;
    let toml = common::map_toml(1, &shards, "[tenants]\nacme = \"a\"\n");
    let map = MapLoader::without_env().load_str(&toml).unwrap();
    let migrations =
        Migrations::load(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/notes")).unwrap();
    for report in shard_router::migrate::migrate(&map, &migrations, |_, _| {}).await {
        report.outcome.unwrap();
    }
    let control_url = control_db.url(0);
    let mut control = shard_router::control::ControlPlane::connect(&control_url)
        .await
        .unwrap();
    control.init().await.unwrap();
    control
        .publish(&toml, &shard_router::control::PublishOptions::default())
        .await
        .unwrap();

    let addr: SocketAddr = free_addr();
    let _server = start_example(
        addr,
        &[
            "--control",
            &control_url,
            "--listen",
            &addr.to_string(),
            "--admin-listen",
            "127.0.0.1:0",
        ],
    )
    .await;

    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let failures: Arc<Mutex<Vec<(u16, String)>>> = Arc::default();
    let clients: Vec<_> = (0..4)
        .map(|k| {
            let (acked, stop, failures) = (acked.clone(), stop.clone(), failures.clone());
            tokio::spawn(async move {
                let (mut posts, mut gets) = (0u32, 0u32);
                while !stop.load(Ordering::Relaxed) {
                    if k % 2 == 0 || posts % 4 != 0 {
                        let (status, body) =
                            http(addr, "POST", Some("acme"), "{\"body\":\"during the move\"}")
                                .await;
                        if status == 201 {
                            let note: serde_json::Value = serde_json::from_str(&body).unwrap();
                            acked
                                .lock()
                                .unwrap()
                                .insert(note["id"].as_str().unwrap().to_owned());
                        } else {
                            failures.lock().unwrap().push((status, body));
                        }
                        posts += 1;
                    } else {
                        let (status, body) = http(addr, "GET", Some("acme"), "").await;
                        if status != 200 {
                            failures.lock().unwrap().push((status, body));
                        }
                        gets += 1;
                        posts += 1;
                    }
                }
                (posts, gets)
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let out = common::shardctl(
        &control_url,
        &[
            "tenant",
            "move",
            "acme",
            "--to",
            "b",
            "--purge-source",
            "--wait",
            "20",
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut requests = 0;
    for client in clients {
        let (posts, _) = client.await.unwrap();
        requests += posts;
    }
    let acked = acked.lock().unwrap().clone();
    let failures = failures.lock().unwrap().clone();
    println!(
        "{requests} requests during the move, {} notes acknowledged, {} failed: {:?}",
        acked.len(),
        failures.len(),
        failures.iter().take(3).collect::<Vec<_>>()
    );
    assert!(failures.is_empty(), "no request failed because of the move");
    let target = common::connect(&shards.url(1)).await;
    let on_target: Vec<String> = target
        .query("SELECT id::text FROM notes WHERE tenant_id = 'acme'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let unique: BTreeSet<String> = on_target.iter().cloned().collect();
    assert_eq!(unique.len(), on_target.len(), "once each");
    assert_eq!(unique, acked, "exactly the acknowledged notes");
    assert_eq!(notes_of(&shards.url(0), "acme").await, 0, "source purged");
}
