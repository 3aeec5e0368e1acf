//! Turning the parsed file into a [`ShardMap`], or into every problem it has.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::pins::PinIndex;
use super::placement::Ring;
use super::{
    MovePhase, MoveRoute, PoolSettings, Replica, Shard, ShardIndex, ShardMap, TenantCase,
    DEFAULT_VNODES,
};
use crate::tenant::validate as validate_tenant;

/// The most shards a map may hold.
pub(crate) const MAX_SHARDS: usize = 4096;
/// The most ring points (vnodes × total weight) a map may hold.
const MAX_RING_POINTS: u64 = 1 << 20;

/// Why a shard map could not be loaded.
///
/// ```
/// use shard_router::map::{MapError, MapLoader};
///
/// let err = MapLoader::without_env().load_str("version = 0").unwrap_err();
/// let MapError::Invalid { problems } = &err else { panic!() };
/// assert_eq!(problems[0].field, "version");
/// assert!(err.to_string().contains("version: must be at least 1"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    /// The file could not be read.
    #[error("cannot read shard map {path}: {cause}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// The text is not TOML, or a value has the wrong type, or a field is unknown.
    #[error("shard map {origin} cannot be parsed: {cause}")]
    Parse {
        /// The file, or `text` for a map given as a string.
        origin: String,
        /// What the parser said (TOML errors carry the line).
        cause: String,
    },
    /// The map parsed but breaks rules; every problem is listed.
    #[error("shard map is invalid:\n{}", list(problems))]
    Invalid {
        /// Each problem with the field it concerns.
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One broken rule, naming the field (`shards.a.url`, `tenants.acme`, ...).
///
/// ```
/// let p = shard_router::map::Problem { field: "version".into(), reason: "must be at least 1".into() };
/// assert_eq!(p.to_string(), "version: must be at least 1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The dotted path of the field.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// The file as written. Everything is optional or wide so that validation, not
/// the deserializer, reports missing and out-of-range values with their field.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMap {
    version: Option<i64>,
    tenant_column: Option<String>,
    tenant_setting: Option<String>,
    tenant_case: Option<String>,
    placement: Option<RawPlacement>,
    #[serde(default)]
    shards: BTreeMap<String, RawShard>,
    #[serde(default)]
    tenants: BTreeMap<String, String>,
    #[serde(default)]
    moves: BTreeMap<String, RawMove>,
}

/// What environment overrides may set: scalars and declared shards' settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOverrides {
    version: Option<i64>,
    tenant_column: Option<String>,
    tenant_setting: Option<String>,
    tenant_case: Option<String>,
    placement: Option<RawPlacement>,
    #[serde(default)]
    shards: BTreeMap<String, RawShardOverride>,
}

/// A shard's settings from the environment: as in the file, with replicas
/// addressed by their position (`SHARD_ROUTER__SHARDS__A__REPLICAS__0__URL`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShardOverride {
    url: Option<String>,
    admin_url: Option<String>,
    weight: Option<i64>,
    pool: Option<RawPool>,
    #[serde(default)]
    replicas: BTreeMap<String, RawReplica>,
    max_replica_lag_ms: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlacement {
    vnodes: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShard {
    url: Option<String>,
    /// The name of an environment variable holding `url`'s password.
    password_env: Option<String>,
    admin_url: Option<String>,
    /// The same for `admin_url`.
    admin_password_env: Option<String>,
    weight: Option<i64>,
    pool: Option<RawPool>,
    #[serde(default)]
    replicas: Vec<RawReplica>,
    max_replica_lag_ms: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplica {
    url: Option<String>,
    password_env: Option<String>,
    weight: Option<i64>,
    pool: Option<RawPool>,
}

impl RawPool {
    /// Sets in `target` what this (an override) sets.
    fn lay_over(self, target: &mut RawPool) {
        let set = |target: &mut Option<i64>, value: Option<i64>| {
            if value.is_some() {
                *target = value;
            }
        };
        set(&mut target.max_size, self.max_size);
        set(&mut target.wait_timeout_ms, self.wait_timeout_ms);
        set(&mut target.connect_timeout_ms, self.connect_timeout_ms);
        set(&mut target.idle_timeout_ms, self.idle_timeout_ms);
        set(
            &mut target.tenant_max_connections,
            self.tenant_max_connections,
        );
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    max_size: Option<i64>,
    wait_timeout_ms: Option<i64>,
    connect_timeout_ms: Option<i64>,
    tenant_max_connections: Option<i64>,
    idle_timeout_ms: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMove {
    from: Option<String>,
    to: Option<String>,
    phase: Option<String>,
}

/// Collects problems while validating.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            reason: reason.into(),
        });
    }

    /// `value` if it lies in `min..=max`, else records a problem.
    fn ranged(&mut self, field: &str, value: Option<i64>, default: i64, min: i64, max: i64) -> i64 {
        let value = value.unwrap_or(default);
        if value < min || value > max {
            self.add(
                field,
                format!("must be between {min} and {max}, got {value}"),
            );
            default
        } else {
            value
        }
    }
}

/// A shard name: lowercase ASCII letters, digits and `_`, starting with a
/// letter. Lowercase because environment overrides arrive lowercased.
fn valid_shard_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn valid_identifier(name: &str) -> bool {
    valid_shard_name(name)
}

impl RawMap {
    /// Takes pins read outside the TOML parser; refuses (false) if the
    /// document held pins of its own too, which the parser must judge.
    pub(super) fn set_pins(&mut self, pins: BTreeMap<String, String>) -> bool {
        if !self.tenants.is_empty() {
            return false;
        }
        self.tenants = pins;
        true
    }

    /// Lays environment overrides over the file. Overrides of shards the file
    /// lacks are ignored with a warning: they never add a shard.
    pub(super) fn apply(&mut self, overrides: RawOverrides) -> Result<(), MapError> {
        fn set<T>(target: &mut Option<T>, value: Option<T>) {
            if value.is_some() {
                *target = value;
            }
        }
        set(&mut self.version, overrides.version);
        set(&mut self.tenant_column, overrides.tenant_column);
        set(&mut self.tenant_setting, overrides.tenant_setting);
        set(&mut self.tenant_case, overrides.tenant_case);
        if let Some(placement) = overrides.placement {
            set(
                &mut self.placement.get_or_insert_with(Default::default).vnodes,
                placement.vnodes,
            );
        }
        for (name, o) in overrides.shards {
            let Some(shard) = self.shards.get_mut(&name) else {
                // A leftover variable for a shard the map no longer declares
                // (removed, or a map from before it was added): it never adds
                // a shard, and refusing it would stop every router on the next
                // map. Typos in keys of known shards are still refused.
                tracing::warn!(
                    shard = %name,
                    "environment override for a shard this map does not declare; ignored"
                );
                continue;
            };
            set(&mut shard.url, o.url);
            set(&mut shard.admin_url, o.admin_url);
            set(&mut shard.weight, o.weight);
            set(&mut shard.max_replica_lag_ms, o.max_replica_lag_ms);
            if let Some(pool) = o.pool {
                pool.lay_over(shard.pool.get_or_insert_with(Default::default));
            }
            for (position, o) in o.replicas {
                // Like shards: an override never adds a replica.
                let Some(replica) = position
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| shard.replicas.get_mut(i))
                else {
                    tracing::warn!(
                        shard = %name,
                        replica = %position,
                        "environment override for a replica this map does not declare; ignored"
                    );
                    continue;
                };
                set(&mut replica.url, o.url);
                set(&mut replica.weight, o.weight);
                if let Some(pool) = o.pool {
                    pool.lay_over(replica.pool.get_or_insert_with(Default::default));
                }
            }
        }
        Ok(())
    }

    pub(super) fn validate(self) -> Result<ShardMap, MapError> {
        let mut problems = Problems::default();

        let version = match self.version {
            None => {
                problems.add(
                    "version",
                    "is missing; every map needs a version of at least 1",
                );
                0
            }
            Some(v) if v < 1 => {
                problems.add("version", format!("must be at least 1, got {v}"));
                0
            }
            Some(v) => v as u64,
        };

        let vnodes = problems.ranged(
            "placement.vnodes",
            self.placement.as_ref().and_then(|p| p.vnodes),
            DEFAULT_VNODES as i64,
            1,
            65_536,
        ) as u32;

        let tenant_column = self.tenant_column.unwrap_or_else(|| "tenant_id".to_owned());
        if !valid_identifier(&tenant_column) {
            problems.add(
                "tenant_column",
                "must be a lowercase identifier (a-z, 0-9, _; starting with a letter)",
            );
        }

        let tenant_setting = self.tenant_setting;
        if let Some(setting) = &tenant_setting {
            let valid = setting
                .split_once('.')
                .is_some_and(|(a, b)| valid_identifier(a) && valid_identifier(b));
            if !valid {
                problems.add(
                    "tenant_setting",
                    "must be a custom setting name like app.tenant_id (two lowercase identifiers joined by a dot)",
                );
            }
        }

        let tenant_case = match self.tenant_case.as_deref() {
            None | Some("exact") => TenantCase::Exact,
            Some("lower") => TenantCase::Lower,
            Some(other) => {
                // A short word is echoed (a typo to see); anything else may be
                // a value pasted into the wrong key, a URL with its password.
                let got = if other.len() <= 16 && other.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    format!(", got {other:?}")
                } else {
                    String::new()
                };
                problems.add(
                    "tenant_case",
                    format!("must be \"exact\" or \"lower\"{got}"),
                );
                TenantCase::Exact
            }
        };
        // Under `lower` every id is lowercased before lookup: a name with an
        // upper-case letter could never be reached.
        let unreachable = |tenant: &str| {
            tenant_case == TenantCase::Lower && tenant.bytes().any(|b| b.is_ascii_uppercase())
        };
        for tenant in self.tenants.keys().chain(self.moves.keys()) {
            if unreachable(tenant) {
                let kind = if self.tenants.contains_key(tenant) {
                    "tenants"
                } else {
                    "moves"
                };
                problems.add(
                    format!("{kind}.{tenant}"),
                    format!(
                        "tenant_case = \"lower\" lowercases every tenant id, so this entry could never be reached; write it as {:?}",
                        tenant.to_ascii_lowercase()
                    ),
                );
            }
        }

        if self.shards.is_empty() {
            problems.add("shards", "no shards; declare at least one [shards.NAME]");
        }
        if self.shards.len() > MAX_SHARDS {
            problems.add(
                "shards",
                format!("at most {MAX_SHARDS} shards, got {}", self.shards.len()),
            );
        }
        let mut shards = Vec::with_capacity(self.shards.len());
        for (name, raw) in &self.shards {
            let field = format!("shards.{name}");
            if !valid_shard_name(name) {
                problems.add(
                    &field,
                    "shard names are 1-63 lowercase letters, digits and _, starting with a letter",
                );
            }
            let (url, mut endpoint) = required_url(&mut problems, &field, raw.url.as_ref());
            password_from_env(
                &mut problems,
                &field,
                "password_env",
                raw.password_env.as_deref(),
                &mut endpoint,
            );
            let admin =
                raw.admin_url
                    .as_ref()
                    .and_then(|url| match crate::pg::Endpoint::parse(url) {
                        Ok(mut endpoint) => {
                            password_from_env(
                                &mut problems,
                                &field,
                                "admin_password_env",
                                raw.admin_password_env.as_deref(),
                                &mut endpoint,
                            );
                            Some((url.clone(), endpoint))
                        }
                        Err(reason) => {
                            problems.add(format!("{field}.admin_url"), reason);
                            None
                        }
                    });
            let weight =
                problems.ranged(&format!("{field}.weight"), raw.weight, 1, 0, 10_000) as u32;
            let pool = pool_settings(&mut problems, &field, raw.pool.as_ref());
            let max_replica_lag_ms = problems.ranged(
                &format!("{field}.max_replica_lag_ms"),
                raw.max_replica_lag_ms,
                1000,
                1,
                3_600_000,
            ) as u64;
            let mut replicas = Vec::with_capacity(raw.replicas.len());
            for (i, replica) in raw.replicas.iter().enumerate() {
                let at = format!("{field}.replicas[{i}]");
                let (url, mut endpoint) = required_url(&mut problems, &at, replica.url.as_ref());
                password_from_env(
                    &mut problems,
                    &at,
                    "password_env",
                    replica.password_env.as_deref(),
                    &mut endpoint,
                );
                let weight =
                    problems.ranged(&format!("{at}.weight"), replica.weight, 1, 0, 10_000) as u32;
                let pool = pool_settings(&mut problems, &at, replica.pool.as_ref());
                replicas.push(Replica {
                    url,
                    endpoint,
                    weight,
                    pool,
                });
            }
            shards.push(Shard {
                name: name.clone(),
                url,
                endpoint,
                admin,
                weight,
                pool,
                replicas,
                max_replica_lag: Duration::from_millis(max_replica_lag_ms),
            });
        }
        // BTreeMap iteration already sorted the shards by name, which ShardIndex relies on.
        let index_of = |name: &str| {
            shards
                .binary_search_by(|s: &Shard| s.name.as_str().cmp(name))
                .ok()
                .map(|i| ShardIndex(i as u16))
        };

        let total_weight: u64 = shards.iter().map(|s| s.weight as u64).sum();
        if !shards.is_empty() && total_weight == 0 {
            problems.add(
                "shards",
                "every shard has weight 0; at least one shard must take new tenants",
            );
        }
        if total_weight * vnodes as u64 > MAX_RING_POINTS {
            problems.add(
                "placement.vnodes",
                format!(
                    "vnodes × total weight is {}; the limit is {MAX_RING_POINTS}",
                    total_weight * vnodes as u64
                ),
            );
        }

        let mut pins = Vec::with_capacity(self.tenants.len());
        for (tenant, shard) in &self.tenants {
            if let Err(e) = validate_tenant(tenant) {
                problems.add(
                    format!("tenants.{tenant}"),
                    format!("not a valid tenant id: {e}"),
                );
                continue;
            }
            match index_of(shard) {
                Some(index) => pins.push((tenant.as_str(), index)),
                None => problems.add(
                    format!("tenants.{tenant}"),
                    format!("pinned to unknown shard {shard:?}"),
                ),
            }
        }

        let mut moves = HashMap::with_capacity(self.moves.len());
        for (tenant, raw) in self.moves {
            let field = format!("moves.{tenant}");
            if let Err(e) = validate_tenant(&tenant) {
                problems.add(&field, format!("not a valid tenant id: {e}"));
                continue;
            }
            if self.tenants.contains_key(&tenant) {
                problems.add(
                    &field,
                    "tenant is both pinned and moving; a moving tenant must not have a pin",
                );
            }
            let mut side = |which: &str, name: &Option<String>| match name {
                None => {
                    problems.add(format!("{field}.{which}"), "is missing");
                    None
                }
                Some(name) => {
                    let index = index_of(name);
                    if index.is_none() {
                        problems.add(
                            format!("{field}.{which}"),
                            format!("unknown shard {name:?}"),
                        );
                    }
                    index
                }
            };
            let (from, to) = (side("from", &raw.from), side("to", &raw.to));
            let phase = match raw.phase.as_deref() {
                None | Some("dual_write") => Some(MovePhase::DualWrite),
                Some("reversed") => Some(MovePhase::Reversed),
                Some(other) => {
                    problems.add(
                        format!("{field}.phase"),
                        format!("unknown phase {other:?}; expected \"dual_write\" or \"reversed\""),
                    );
                    None
                }
            };
            if raw.from.is_some() && raw.from == raw.to {
                problems.add(&field, "source and target are the same shard");
            }
            if let (Some(from), Some(to), Some(phase)) = (from, to, phase) {
                if from != to {
                    moves.insert(tenant.into_boxed_str(), MoveRoute { from, to, phase });
                }
            }
        }

        if !problems.0.is_empty() {
            return Err(MapError::Invalid {
                problems: problems.0,
            });
        }
        let pins = PinIndex::build(pins.into_iter());
        let ring = Ring::build(
            shards
                .iter()
                .map(|s| (s.name.as_str(), s.weight as usize * vnodes as usize)),
        );
        Ok(ShardMap {
            version,
            vnodes,
            tenant_column,
            tenant_setting,
            tenant_case,
            shards,
            pins,
            moves,
            ring,
        })
    }
}

/// The `url` under `field` (a shard's or a replica's), parsed; a missing or
/// malformed one is a problem, and an empty endpoint stands in for it.
fn required_url(
    problems: &mut Problems,
    field: &str,
    url: Option<&String>,
) -> (String, crate::pg::Endpoint) {
    let unparsed = || crate::pg::Endpoint {
        config: tokio_postgres::Config::new(),
        tls: Default::default(),
    };
    match url {
        None => {
            problems.add(format!("{field}.url"), "is missing");
            (String::new(), unparsed())
        }
        Some(url) => match crate::pg::Endpoint::parse(url) {
            Ok(endpoint) => (url.clone(), endpoint),
            Err(reason) => {
                problems.add(format!("{field}.url"), reason);
                (url.clone(), unparsed())
            }
        },
    }
}

/// Sets `endpoint`'s password from the environment variable `var` names
/// (`password_env`): the secret stays out of the map, and out of the control
/// database that stores it. A URL that carries a password as well is refused;
/// a variable not set here is a warning (the map may be checked on a machine
/// without the secret; connections then go without a password).
fn password_from_env(
    problems: &mut Problems,
    field: &str,
    key: &str,
    var: Option<&str>,
    endpoint: &mut crate::pg::Endpoint,
) {
    let Some(var) = var else {
        return;
    };
    if endpoint.config.get_password().is_some() {
        problems.add(
            format!("{field}.{key}"),
            "the url carries a password too; keep it in one place, the environment",
        );
        return;
    }
    match std::env::var(var) {
        Ok(password) => {
            endpoint.config.password(password);
        }
        Err(_) => {
            tracing::warn!(
                field,
                variable = var,
                "{field}.{key}: {var} is not set here; connecting without a password"
            );
        }
    }
}

/// A `pool` table (a shard's or a replica's) with defaults, problems reported
/// under `field`.
fn pool_settings(problems: &mut Problems, field: &str, pool: Option<&RawPool>) -> PoolSettings {
    let defaults = PoolSettings::default();
    let max_size = problems.ranged(
        &format!("{field}.pool.max_size"),
        pool.and_then(|p| p.max_size),
        defaults.max_size as i64,
        1,
        10_000,
    ) as usize;
    let wait_ms = problems.ranged(
        &format!("{field}.pool.wait_timeout_ms"),
        pool.and_then(|p| p.wait_timeout_ms),
        defaults.wait_timeout.as_millis() as i64,
        1,
        600_000,
    ) as u64;
    let connect_ms = problems.ranged(
        &format!("{field}.pool.connect_timeout_ms"),
        pool.and_then(|p| p.connect_timeout_ms),
        defaults.connect_timeout.as_millis() as i64,
        1,
        600_000,
    ) as u64;
    let tenant_max = pool.and_then(|p| p.tenant_max_connections).map(|n| {
        problems.ranged(
            &format!("{field}.pool.tenant_max_connections"),
            Some(n),
            1,
            1,
            max_size as i64,
        ) as usize
    });
    // 0: never close idle connections.
    let idle_ms = problems.ranged(
        &format!("{field}.pool.idle_timeout_ms"),
        pool.and_then(|p| p.idle_timeout_ms),
        defaults.idle_timeout.map_or(0, |d| d.as_millis() as i64),
        0,
        86_400_000,
    ) as u64;
    PoolSettings {
        max_size,
        wait_timeout: Duration::from_millis(wait_ms),
        connect_timeout: Duration::from_millis(connect_ms),
        tenant_max_connections: tenant_max,
        idle_timeout: (idle_ms > 0).then(|| Duration::from_millis(idle_ms)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn password_env_keeps_the_secret_out_of_the_map() {
        // Each test process has its own environment; the name is this test's.
        std::env::set_var("SR_TEST_PASSWORD_ENV_A", "s3cret");
        let load = |toml: &str| crate::map::MapLoader::without_env().load_str(toml);
        let map = load(
            "version = 1\n[shards.a]\nurl = \"postgres://app@db/a\"\npassword_env = \"SR_TEST_PASSWORD_ENV_A\"\n\
             admin_url = \"postgres://admin@db/a\"\nadmin_password_env = \"SR_TEST_PASSWORD_ENV_A\"\n\
             replicas = [{ url = \"postgres://app@r/a\", password_env = \"SR_TEST_PASSWORD_ENV_A\" }]\n",
        )
        .unwrap();
        let shard = &map.shards()[0];
        assert_eq!(shard.pg_config().get_password(), Some(&b"s3cret"[..]));
        assert_eq!(
            shard.admin_endpoint().config.get_password(),
            Some(&b"s3cret"[..])
        );
        assert_eq!(
            shard.replicas()[0].endpoint.config.get_password(),
            Some(&b"s3cret"[..])
        );
        assert!(!shard.url().contains("s3cret"));
        // A variable not set here: the map loads, without a password.
        let unset = load(
            "version = 1\n[shards.a]\nurl = \"postgres://app@db/a\"\npassword_env = \"SR_TEST_PASSWORD_ENV_UNSET\"\n",
        )
        .unwrap();
        assert_eq!(unset.shards()[0].pg_config().get_password(), None);
        // Both a password in the url and password_env: refused by key.
        let err = load(
            "version = 1\n[shards.a]\nurl = \"postgres://app:pw@db/a\"\npassword_env = \"SR_TEST_PASSWORD_ENV_A\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("shards.a.password_env"), "{err}");
    }

    use crate::map::{MapError, MapLoader};
    use proptest::prelude::*;

    fn problems(toml: &str) -> Vec<String> {
        match MapLoader::without_env().load_str(toml) {
            Err(MapError::Invalid { problems }) => problems.iter().map(|p| p.to_string()).collect(),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases: &[(&str, &str)] = &[
            ("[shards.a]\nurl = \"postgres://h/a\"", "version: is missing"),
            ("version = 0\n[shards.a]\nurl = \"postgres://h/a\"", "version: must be at least 1"),
            ("version = 1", "shards: no shards"),
            ("version = 1\n[shards.a]\nweight = 1", "shards.a.url: is missing"),
            ("version = 1\n[shards.a]\nurl = \"mysql://h/a\"", "shards.a.url: not a valid Postgres URL"),
            ("version = 1\n[shards.a]\nurl = \"postgres://h/a\"\npool = { max_size = 0 }", "shards.a.pool.max_size: must be between 1"),
            ("version = 1\n[shards.a]\nurl = \"postgres://h/a\"\nweight = 0", "shards: every shard has weight 0"),
            ("version = 1\n[shards.a]\nurl = \"postgres://h/a\"\n[tenants]\nacme = \"zz\"", "tenants.acme: pinned to unknown shard \"zz\""),
            ("version = 1\n[shards.a]\nurl = \"postgres://h/a\"\n[moves.acme]\nfrom = \"a\"\nto = \"a\"", "moves.acme: source and target are the same shard"),
            ("version = 1\n[shards.a]\nurl = \"postgres://h/a\"\n[moves.acme]\nfrom = \"a\"\nto = \"q\"", "moves.acme.to: unknown shard \"q\""),
            ("version = 1\n[shards.a]\nurl = \"postgres://h/a\"\n[shards.b]\nurl = \"postgres://h/b\"\n[tenants]\nacme = \"a\"\n[moves.acme]\nfrom = \"a\"\nto = \"b\"", "moves.acme: tenant is both pinned and moving"),
            ("version = 1\n[shards.A]\nurl = \"postgres://h/a\"", "shards.A: shard names are"),
            ("version = 1\n[shards.a]\nurl = \"postgres://h/a\"\n[tenants]\n\"x y\" = \"a\"", "tenants.x y: not a valid tenant id"),
            ("version = 1\n[shards.a]\nurl = \"postgres://h/a\"\npool = { idle_timeout_ms = -1 }", "shards.a.pool.idle_timeout_ms: must be between 0"),
            ("version = 1\n[shards.a]\nurl = \"postgres://h/a\"\nreplicas = [{ weight = 1 }]", "shards.a.replicas[0].url: is missing"),
            ("version = 1\n[shards.a]\nurl = \"postgres://h/a\"\nreplicas = [{ url = \"mysql://r/a\" }]", "shards.a.replicas[0].url: not a valid Postgres URL"),
            ("version = 1\n[shards.a]\nurl = \"postgres://h/a\"\nreplicas = [{ url = \"postgres://r/a\", pool = { max_size = 0 } }]", "shards.a.replicas[0].pool.max_size: must be between 1"),
            ("version = 1\n[shards.a]\nurl = \"postgres://h/a\"\nmax_replica_lag_ms = 0", "shards.a.max_replica_lag_ms: must be between 1"),
            ("version = 1\ntenant_case = \"upper\"\n[shards.a]\nurl = \"postgres://h/a\"", "tenant_case: must be \"exact\" or \"lower\""),
            ("version = 1\ntenant_case = \"lower\"\n[shards.a]\nurl = \"postgres://h/a\"\n[tenants]\nACME = \"a\"", "tenants.ACME: tenant_case = \"lower\" lowercases every tenant id"),
            ("version = 1\ntenant_case = \"lower\"\n[shards.a]\nurl = \"postgres://h/a\"\n[shards.b]\nurl = \"postgres://h/b\"\n[moves.Acme]\nfrom = \"a\"\nto = \"b\"", "moves.Acme: tenant_case"),
        ];
        for (toml, expected) in cases {
            let got = problems(toml);
            assert!(
                got.iter().any(|p| p.starts_with(expected)),
                "for\n{toml}\nexpected a problem starting with {expected:?}, got {got:?}"
            );
        }
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let got = problems("version = 0\n[shards.a]\npool = { max_size = 0 }");
        assert_eq!(got.len(), 3, "{got:?}");
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_parse_errors_with_a_line() {
        let err = MapLoader::without_env()
            .load_str("version = 1\n[shards.a]\nurl = \"postgres://h/a\"\nwieght = 2")
            .unwrap_err();
        assert!(err.to_string().contains("wieght"), "{err}");
        let err = MapLoader::without_env()
            .load_str("version = 1\n[shards.a\n")
            .unwrap_err();
        assert!(matches!(err, MapError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            let _ = MapLoader::without_env().load_str(&text);
        }

        #[test]
        fn arbitrary_maps_of_valid_shape_either_validate_or_explain(
            version in -3i64..5,
            weights in proptest::collection::vec(-1i64..3, 0..4),
            pins in proptest::collection::vec(("[a-z'; ]{1,6}", 0usize..5), 0..5),
        ) {
            let mut toml = format!("version = {version}\n");
            for (i, w) in weights.iter().enumerate() {
                toml += &format!("[shards.s{i}]\nurl = \"postgres://h/s{i}\"\nweight = {w}\n");
            }
            toml += "[tenants]\n";
            for (tenant, shard) in &pins {
                toml += &format!("{tenant:?} = \"s{shard}\"\n");
            }
            match MapLoader::without_env().load_str(&toml) {
                Ok(map) => {
                    prop_assert!(map.version() >= 1);
                    prop_assert!(map.shards().iter().any(|s| s.weight() > 0));
                    prop_assert!(map.ring_points() > 0);
                }
                Err(MapError::Invalid { problems }) => prop_assert!(!problems.is_empty()),
                Err(MapError::Parse { .. }) => {} // duplicate pin keys
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }
}
