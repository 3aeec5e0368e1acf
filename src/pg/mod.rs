//! Postgres plumbing shared by every part that talks to a database: parsing a
//! connection string (with libpq's TLS modes), connecting, error text, and
//! the one list of advisory-lock keys, and [`ShardError`] (what went wrong on one
//! shard) with the one way to connect for administrative work.
//!
//! Connection strings are URLs (`postgres://user:pw@host:5432/db?sslmode=verify-full`)
//! or key=value strings (`host=h dbname=db sslmode=require`). Besides what
//! tokio-postgres reads, two keys are understood here:
//!
//! - `sslmode`: `disable`, `prefer` (the default), `require`, `verify-ca` or
//!   `verify-full`; see [`SslMode`].
//! - `sslrootcert`: a PEM file of trusted CA certificates, or `system` for the
//!   operating system's roots (the default when a mode verifies).
//!
//! Client certificates (`sslcert`, `sslkey`) are refused by name: they are not
//! supported yet.

mod shard_error;
mod tls;

use std::net::IpAddr;
use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::tenant::TenantId;

pub use shard_error::{BoxError, ShardError};
pub use tls::SslMode;
pub(crate) use tls::TlsSettings;

/// A parsed connection string: what tokio-postgres needs, and the TLS settings.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    pub(crate) config: tokio_postgres::Config,
    pub(crate) tls: TlsSettings,
}

/// The connector every connection uses (plaintext ones never call it).
pub(crate) type Connector = MakeRustlsConnect;

/// A connection's I/O half, to be spawned or polled by the caller.
pub(crate) type Connection =
    tokio_postgres::Connection<Socket, <Connector as MakeTlsConnect<Socket>>::Stream>;

impl Endpoint {
    /// Parses a URL or key=value string. Errors never echo the string (it may
    /// hold a password).
    pub(crate) fn parse(text: &str) -> Result<Endpoint, String> {
        if text.trim().is_empty() {
            return Err("is empty".to_owned());
        }
        let (rest, ssl) = take_ssl_params(text)?;
        let mut tls = TlsSettings::default();
        for (key, value) in ssl {
            match key.as_str() {
                "sslmode" => tls.mode = value.parse()?,
                "sslrootcert" if value == "system" => tls.root_cert = None,
                "sslrootcert" => tls.root_cert = Some(value.into()),
                _ => unreachable!("take_ssl_params returns only these keys"),
            }
        }
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e| format!("not a valid Postgres URL: {e}"))?;
        if config.get_hosts().is_empty() {
            return Err("names no host".to_owned());
        }
        config.ssl_mode(match tls.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer if all_loopback(&config) => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        Ok(Endpoint { config, tls })
    }

    /// What is unprotected about this endpoint's connections, if anything:
    /// `None` under `verify-full`, and for a loopback host (no wire to
    /// protect) under `prefer` or `disable`.
    pub(crate) fn unverified(&self) -> Option<&'static str> {
        let local = all_loopback(&self.config);
        match self.tls.mode {
            SslMode::VerifyFull => None,
            SslMode::VerifyCa => Some("the certificate's chain is checked, not its host name"),
            SslMode::Require => Some("encrypted, but the certificate is not checked"),
            SslMode::Prefer if local => None,
            SslMode::Prefer => {
                Some("may fall back to plaintext, and the certificate is not checked")
            }
            SslMode::Disable if local => None,
            SslMode::Disable => Some("plaintext"),
        }
    }

    /// Logs, as a warning, what [`Endpoint::unverified`] finds: `what` names
    /// the endpoint (`shard a`, `replica 0 of shard a`, `the control database`).
    pub(crate) fn warn_if_unverified(&self, what: &str) {
        if let Some(problem) = self.unverified() {
            tracing::warn!(
                endpoint = what,
                sslmode = %self.tls.mode,
                "{what}: {problem}; set sslmode=verify-full for a remote server"
            );
        }
    }

    /// Connects, giving up after `timeout` unless the string sets its own.
    pub(crate) async fn connect(
        &self,
        timeout: Duration,
    ) -> Result<(Client, Connection), BoxError> {
        let mut config = self.config.clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(timeout);
        }
        Ok(config.connect(self.tls.connector()?).await?)
    }
}

/// Whether every host is this machine, where TLS protects nothing.
fn all_loopback(config: &tokio_postgres::Config) -> bool {
    let addrs = config.get_hostaddrs();
    if !addrs.is_empty() {
        return addrs.iter().all(IpAddr::is_loopback);
    }
    config.get_hosts().iter().all(|host| match host {
        Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .trim_matches(['[', ']'])
                    .parse::<IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        #[cfg(unix)]
        Host::Unix(_) => true,
    })
}

/// Splits the TLS keys this module reads from the rest of a connection string.
fn take_ssl_params(text: &str) -> Result<(String, Vec<(String, String)>), String> {
    let mut taken = Vec::new();
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" | "sslrootcert" => {
                taken.push((key.to_owned(), value.to_owned()));
                Ok(true)
            }
            "sslcert" | "sslkey" | "sslpassword" => {
                Err(format!("`{key}`: client certificates are not supported"))
            }
            _ => Ok(false),
        }
    };
    let rest = match text
        .strip_prefix("postgres://")
        .or_else(|| text.strip_prefix("postgresql://"))
    {
        Some(after_scheme) => {
            let scheme = &text[..text.len() - after_scheme.len()];
            match after_scheme.split_once('?') {
                None => text.to_owned(),
                Some((head, query)) => {
                    let mut kept = Vec::new();
                    for param in query.split('&').filter(|p| !p.is_empty()) {
                        let (key, value) = param.split_once('=').unwrap_or((param, ""));
                        if !take(&percent_decode(key), &percent_decode(value))? {
                            kept.push(param);
                        }
                    }
                    if kept.is_empty() {
                        format!("{scheme}{head}")
                    } else {
                        format!("{scheme}{head}?{}", kept.join("&"))
                    }
                }
            }
        }
        None => match key_values(text) {
            // Malformed: tokio-postgres reports it.
            None => text.to_owned(),
            Some(pairs) => {
                let mut kept = Vec::new();
                for (key, value) in pairs {
                    if !take(&key, &value)? {
                        let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
                        kept.push(format!("{key}='{escaped}'"));
                    }
                }
                kept.join(" ")
            }
        },
    };
    Ok((rest, taken))
}

/// `%XX` decoding of a URL query component (`+` is left alone, as libpq does).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The pairs of a `key=value key='quoted \' value'` string; `None` if malformed.
fn key_values(text: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Some(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        chars.next_if_eq(&'=')?;
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\'' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next()?);
                } else {
                    value.push(c);
                }
            }
        }
        if key.is_empty() {
            return None;
        }
        pairs.push((key, value));
    }
}

/// The most precise message in an error chain: the database's own when there is one.
pub(crate) fn error_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut text = err.to_string();
    while let Some(e) = current {
        if let Some(db) = e.downcast_ref::<tokio_postgres::error::DbError>() {
            return db.to_string();
        }
        if e.source().is_none() {
            text = e.to_string();
        }
        current = e.source();
    }
    text
}

/// Refuses a shard on which row-level security hides rows of tenant tables
/// from the connected role: a data check, copy, verify or purge through it
/// would see none of those rows and conclude there are none.
pub(crate) async fn refuse_hidden_rows(
    client: &Client,
    shard: &str,
    column: &str,
) -> Result<(), ShardError> {
    // Superusers and BYPASSRLS roles see everything; a table's owner does too
    // unless the table forces row security on its owner.
    let row = client
        .query_one(
            "SELECT current_user::text, \
               coalesce(array_agg(format('%I.%I', n.nspname, c.relname) ORDER BY n.nspname, c.relname), '{}') \
             FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute t ON t.attrelid = c.oid AND t.attname = $1 AND NOT t.attisdropped \
             WHERE c.relkind IN ('r', 'p') AND c.relrowsecurity \
               AND c.relname NOT LIKE 'shard\\_router\\_%' \
               AND (c.relforcerowsecurity OR NOT pg_has_role(c.relowner, 'USAGE')) \
               AND NOT (SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user)",
            &[&column],
        )
        .await
        .map_err(|e| ShardError::database(shard, e))?;
    let tables: Vec<String> = row.get(1);
    if tables.is_empty() {
        return Ok(());
    }
    Err(ShardError::RowSecurity {
        shard: shard.to_owned(),
        role: row.get(0),
        tables,
    })
}

/// What a pool may hold and how long it waits (from a shard's or a replica's
/// `pool` settings in the map).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolLimits {
    pub(crate) max_size: usize,
    pub(crate) wait_timeout: Duration,
    pub(crate) connect_timeout: Duration,
}

/// A pool of connections to `config` (a shard or one of its read replicas);
/// `replica_mode` for applying a moving tenant's row images.
pub(crate) fn pool_for(
    config: &tokio_postgres::Config,
    settings: &PoolLimits,
    connector: Connector,
    replica: bool,
    identity: Option<&str>,
) -> Result<deadpool_postgres::Pool, String> {
    let identity = identity.map(str::to_owned);
    let mut pg = config.clone();
    pg.connect_timeout(settings.connect_timeout);
    if pg.get_application_name().is_none() {
        pg.application_name("shard-router");
    }
    if replica {
        // Row images from the primary: the shard's own triggers, defaults and
        // foreign-key checks must not change or refuse them, and their
        // statements are the same every time, so plan them once.
        let mode = "-c session_replication_role=replica -c plan_cache_mode=force_generic_plan";
        let options = match pg.get_options() {
            Some(own) => format!("{own} {mode}"),
            None => mode.to_owned(),
        };
        pg.options(&options);
    }
    use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
    let manager = Manager::from_config(
        pg,
        connector,
        ManagerConfig {
            // A cheap `is_closed` check; what the router sets per checkout is
            // set again at the next one.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        // A single-statement write goes out alone (autocommit, see
        // `TenantDb::execute`); the fence trigger sees a fence raised after the
        // statement took its snapshot only under READ COMMITTED, whatever the
        // database's or role's default.
        //
        // A database whose `shard_router_identity` names another shard (a URL
        // re-pointed by hand, or a map file naming shards differently from
        // the publishes that wrote the identities) gets no connection from
        // this pool: requests fail as the shard being unavailable, instead of
        // reading and writing another shard's data.
        .post_create(deadpool_postgres::Hook::async_fn(move |client, _| {
            let expected = identity.clone();
            Box::pin(async move {
                let set = "SET default_transaction_isolation = 'read committed'";
                let Some(expected) = expected else {
                    return client
                        .batch_execute(set)
                        .await
                        .map_err(deadpool_postgres::HookError::Backend);
                };
                let found = identity_of(client, set)
                    .await
                    .map_err(deadpool_postgres::HookError::Backend)?;
                match found {
                    Some(found) if found != expected => {
                        Err(deadpool_postgres::HookError::message(format!(
                            "shard {expected}: the database at its url is shard {found}'s \
                             (shard_router_identity); fix the url, or publish with --reassign \
                             if that database now holds shard {expected}'s data"
                        )))
                    }
                    _ => Ok(()),
                }
            })
        }))
        .max_size(settings.max_size)
        .wait_timeout(Some(settings.wait_timeout))
        .create_timeout(Some(settings.connect_timeout))
        // No recycle timeout: fast recycling only asks whether the connection
        // is closed, without a round trip, so it never waits; a timeout there
        // would only arm a timer at every checkout.
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| e.to_string())
}

/// Runs `set`, then reads the database's `shard_router_identity` shard name:
/// none without the table, or for a role that may not read it (the check then
/// rests with publish). Two round trips where the table is readable, one
/// otherwise; asking first keeps a database without the table from logging
/// an error for every new connection.
async fn identity_of(
    client: &tokio_postgres::Client,
    set: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    use tokio_postgres::SimpleQueryMessage;
    let first_value = |messages: Vec<SimpleQueryMessage>| {
        messages.into_iter().find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
    };
    let readable = client
        .simple_query(&format!(
            "{set}; SELECT has_table_privilege(to_regclass('shard_router_identity'), 'SELECT')"
        ))
        .await
        .map(first_value)?;
    if readable.as_deref() != Some("t") {
        return Ok(None);
    }
    client
        .simple_query("SELECT shard FROM shard_router_identity")
        .await
        .map(first_value)
}

/// Every advisory-lock key the crate takes, in one place, so that no two can
/// collide unseen (a unit test checks they differ).
pub(crate) mod lock_keys {
    use super::*;

    fn key(name: &[u8]) -> i64 {
        crate::hash::sip13(name) as i64
    }

    /// Held per shard, for a session, while `migrate` runs.
    pub(crate) fn migrate() -> i64 {
        key(b"shard-router:migrate")
    }

    /// Held on the control database while a map is published.
    pub(crate) fn publish() -> i64 {
        key(b"shard-router:publish")
    }

    /// Held per shard database while its identity is written.
    pub(crate) fn identity() -> i64 {
        key(b"shard-router:identity")
    }

    /// Held per shard while the move fence's triggers are installed.
    pub(crate) fn fence_install() -> i64 {
        key(b"shard-router:fence-install")
    }

    /// Held on the control database, for its session, by the mover of the
    /// tenant's move: it ends with the mover's connection, so a dead mover
    /// frees the move at once and a live one keeps it whatever it waits for.
    pub(crate) fn mover(tenant: &TenantId) -> i64 {
        let mut name = b"shard-router:mover:".to_vec();
        name.extend_from_slice(tenant.as_str().as_bytes());
        key(&name)
    }

    /// Held per tenant by every write transaction during its move, and by
    /// the mover's phase changes.
    pub(crate) fn tenant_move(tenant: &TenantId) -> i64 {
        let mut name = b"shard-router:move:".to_vec();
        name.extend_from_slice(tenant.as_str().as_bytes());
        key(&name)
    }
}

#[cfg(test)]
mod tls_warning_tests {
    use super::Endpoint;

    #[test]
    fn every_mode_but_verify_full_is_named_for_a_remote_host() {
        let says = |url: &str| Endpoint::parse(url).unwrap().unverified();
        assert_eq!(says("postgres://db.example/a?sslmode=verify-full"), None);
        for mode in ["verify-ca", "require", "prefer", "disable"] {
            assert!(
                says(&format!("postgres://db.example/a?sslmode={mode}")).is_some(),
                "{mode}"
            );
        }
        // The default is prefer: it may fall back to plaintext.
        assert!(says("postgres://db.example/a")
            .unwrap()
            .contains("plaintext"));
        // Nothing to protect on this machine.
        assert_eq!(says("postgres://127.0.0.1/a"), None);
        assert_eq!(says("postgres://localhost/a?sslmode=disable"), None);
        assert!(says("postgres://127.0.0.1/a?sslmode=require").is_some());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Endpoint {
        Endpoint::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn url_ssl_params_are_read_and_removed() {
        let e = parsed("postgres://u:pw@db.example.com:6432/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x");
        assert_eq!(e.tls.mode, SslMode::VerifyFull);
        assert_eq!(e.tls.root_cert.as_deref(), Some("/etc/ca.pem".as_ref()));
        assert_eq!(
            e.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(e.config.get_application_name(), Some("x"));
        assert_eq!(e.config.get_password(), Some(&b"pw"[..]));
    }

    #[test]
    fn key_value_ssl_params_are_read_and_removed() {
        let e = parsed("host=db.example.com password='it\\'s x' dbname = app sslmode=verify-ca sslrootcert='/a b/ca.pem'");
        assert_eq!(e.tls.mode, SslMode::VerifyCa);
        assert_eq!(e.tls.root_cert.as_deref(), Some("/a b/ca.pem".as_ref()));
        assert_eq!(e.config.get_dbname(), Some("app"));
        assert_eq!(e.config.get_password(), Some(&b"it's x"[..]));
    }

    #[test]
    fn prefer_is_plaintext_on_loopback_only() {
        for local in [
            "postgres://127.0.0.1/db",
            "postgres://localhost/db",
            "host=::1 dbname=db",
        ] {
            assert_eq!(
                parsed(local).config.get_ssl_mode(),
                tokio_postgres::config::SslMode::Disable,
                "{local}"
            );
        }
        assert_eq!(
            parsed("postgres://db.example.com/db").config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Prefer
        );
        assert_eq!(
            parsed("postgres://127.0.0.1/db?sslmode=require")
                .config
                .get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn bad_ssl_settings_are_refused_by_name_without_echoing_the_string() {
        let err = Endpoint::parse("postgres://u:hunter2@h/db?sslmode=allow").unwrap_err();
        assert!(err.contains("sslmode `allow`"), "{err}");
        assert!(!err.contains("hunter2"));
        let err = Endpoint::parse("postgres://u:hunter2@h/db?sslcert=/c.pem").unwrap_err();
        assert!(err.contains("client certificates"), "{err}");
        let err = Endpoint::parse("host=h password=hunter2 sslkey=/k").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn lock_keys_differ() {
        let tenant = TenantId::new("acme").unwrap();
        let mut keys = vec![
            lock_keys::migrate(),
            lock_keys::publish(),
            lock_keys::fence_install(),
            lock_keys::tenant_move(&tenant),
            lock_keys::mover(&tenant),
        ];
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), 5);
    }
}
