//! The tonic example through a real tonic client over loopback (feature `grpc`).
#![cfg(feature = "grpc")]

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{connect, notes_of, Shards};
use shard_router::map::MapLoader;
use shard_router::{Migrations, TenantId};

mod pb {
    include!("../examples/proto/notes.v1.rs");
}
use pb::notes_client::NotesClient;

fn with_tenant<T>(tenant: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-tenant-id", tenant.parse().unwrap());
    request
}

/// Connections open from the router to the test's shard databases.
async fn router_connections(shards: &Shards) -> i64 {
    connect(&common::db_url("postgres"))
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = ANY($1) AND application_name = 'shard-router'",
            &[&shards.names],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn notes_over_grpc_land_on_their_shards_and_failures_are_grpc_statuses() {
    let shards = Shards::create(2).await;
    let toml = common::map_toml(
        1,
        &shards,
        "[shards.down]\nurl = \"postgres://postgres@127.0.0.1:1/down\"\nweight = 0\n\
         pool = { wait_timeout_ms = 500, connect_timeout_ms = 500 }\n\
         [tenants]\nacme = \"b\"\nunlucky = \"down\"\n",
    );
    let map = MapLoader::without_env().load_str(&toml).unwrap();
    let migrations =
        Migrations::load(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/notes")).unwrap();
    let reachable = MapLoader::without_env()
        .load_str(&common::map_toml(1, &shards, ""))
        .unwrap();
    for report in shard_router::migrate::migrate(&reachable, &migrations, |_, _| {}).await {
        report.outcome.unwrap();
    }
    let (_server, mut client) = serve(&toml, "main").await;

    // Missing or invalid tenant: INVALID_ARGUMENT, and no query (no connection opened).
    let missing = client
        .create_note(tonic::Request::new(pb::CreateNoteRequest {
            body: "x".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::InvalidArgument);
    assert!(
        missing.message().contains("x-tenant-id"),
        "{}",
        missing.message()
    );
    let invalid = client
        .list_notes(with_tenant("acme;drop", pb::ListNotesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        router_connections(&shards).await,
        0,
        "rejected requests issued no query"
    );

    // Notes for several tenants land on their located shards; lists are per tenant.
    let tenants: Vec<String> = (0..10)
        .map(|i| format!("grpc-{i}"))
        .chain(["acme".into()])
        .collect();
    for tenant in &tenants {
        for n in 0..2 {
            let note = client
                .create_note(with_tenant(
                    tenant,
                    pb::CreateNoteRequest {
                        body: format!("{n} of {tenant}"),
                    },
                ))
                .await
                .unwrap()
                .into_inner();
            assert!(uuid::Uuid::parse_str(&note.id).is_ok());
        }
    }
    for tenant in &tenants {
        let notes = client
            .list_notes(with_tenant(tenant, pb::ListNotesRequest {}))
            .await
            .unwrap()
            .into_inner()
            .notes;
        assert_eq!(notes.len(), 2, "{tenant}");
        assert!(notes.iter().all(|n| n.body.ends_with(tenant.as_str())));
        let located = map.locate(&TenantId::new(tenant).unwrap()).shard.get();
        for i in 0..2 {
            let expected = if i == located { 2 } else { 0 };
            assert_eq!(
                notes_of(&shards.url(i), tenant).await,
                expected,
                "{tenant} on shard {i}"
            );
        }
    }

    // A shard that is down: UNAVAILABLE within its wait; others unaffected.
    let started = Instant::now();
    let down = client
        .list_notes(with_tenant("unlucky", pb::ListNotesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(down.code(), tonic::Code::Unavailable);
    assert!(started.elapsed() < Duration::from_millis(500) + Duration::from_secs(2));
    assert!(
        !down.message().contains("127.0.0.1"),
        "no internal detail leaks: {}",
        down.message()
    );
    let fine = client
        .list_notes(with_tenant("acme", pb::ListNotesRequest {}))
        .await
        .unwrap();
    assert_eq!(fine.into_inner().notes.len(), 2);
}

/// The tonic example on `toml`, and a client of it.
async fn serve(toml: &str, tag: &str) -> (common::Server, NotesClient<tonic::transport::Channel>) {
    let dir = std::env::temp_dir().join(format!("grpc-test-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let map_path = dir.join("shard-map.toml");
    std::fs::write(&map_path, toml).unwrap();

    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = common::Server(
        Command::new(common::example_binary("tonic_app"))
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
    for _ in 0..200 {
        if let Ok(client) = NotesClient::connect(format!("http://{addr}")).await {
            return (server, client);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gRPC example does not listen");
}

#[tokio::test]
async fn a_write_returns_its_read_token_as_metadata_and_the_token_is_honoured() {
    let shards = Shards::create(2).await;
    shards.run_everywhere(common::NOTES_SCHEMA).await;
    // Shard a lists a "replica" that is its own primary: never healthy (not
    // in recovery), so reads stay on the primary, but writes there return a
    // read-your-writes token.
    let toml = common::map_toml(1, &shards, "[tenants]\nbeta = \"a\"\ngamma = \"b\"\n").replacen(
        &format!("url = \"{}\"\n", shards.url(0)),
        &format!(
            "url = \"{}\"\nreplicas = [{{ url = \"{}\" }}]\n",
            shards.url(0),
            shards.url(0)
        ),
        1,
    );
    assert_eq!(
        MapLoader::without_env().load_str(&toml).unwrap().shards()[0]
            .replicas()
            .len(),
        1
    );
    let (_server, mut client) = serve(&toml, "token").await;
    // The read-your-writes token travels as gRPC metadata: returned by a write
    // on a shard with replicas, honoured when sent back.
    let created = client
        .create_note(with_tenant(
            "beta",
            pb::CreateNoteRequest { body: "b".into() },
        ))
        .await
        .unwrap();
    let token = created
        .metadata()
        .get(shard_router::TOKEN_HEADER)
        .expect("a token in the response metadata")
        .to_str()
        .unwrap()
        .to_owned();
    let parsed: shard_router::ReadToken = token.parse().unwrap();
    assert_eq!((parsed.shard(), parsed.tenant()), ("a", "beta"));
    let mut request = with_tenant("beta", pb::ListNotesRequest {});
    request
        .metadata_mut()
        .insert(shard_router::TOKEN_HEADER, token.parse().unwrap());
    assert_eq!(
        client
            .list_notes(request)
            .await
            .unwrap()
            .into_inner()
            .notes
            .len(),
        1
    );
    // A shard without replicas returns none.
    let plain = client
        .create_note(with_tenant(
            "gamma",
            pb::CreateNoteRequest { body: "c".into() },
        ))
        .await
        .unwrap();
    assert!(plain.metadata().get(shard_router::TOKEN_HEADER).is_none());
}
