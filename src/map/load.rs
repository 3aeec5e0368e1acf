//! Reading a shard map: TOML through the `config` crate, plus environment overrides.

use std::collections::HashMap;
use std::path::Path;

use config::{Config, Environment};

use super::validate::{MapError, RawMap, RawOverrides};
use super::ShardMap;

/// The default prefix of environment overrides.
pub const DEFAULT_ENV_PREFIX: &str = "SHARD_ROUTER";

/// Loads shard maps from TOML, applying environment overrides so that secrets
/// such as shard URLs stay out of the file.
///
/// An override is `{PREFIX}__{PATH}` with `__` between path parts, upper or lower
/// case: `SHARD_ROUTER__SHARDS__A__URL=postgres://app:secret@db-a/app` sets
/// `shards.a.url`. Overrides may set `version`, `tenant_column`,
/// `tenant_setting`, `tenant_case`, `placement.vnodes` and the settings of
/// shards the file declares (`admin_url`, and replicas by position:
/// `SHARD_ROUTER__SHARDS__A__REPLICAS__0__URL`); they never add a shard, a
/// replica, pins or moves. A variable under the prefix that names anything
/// else is refused, so a typo is an error rather than silently ignored.
///
/// # Example
///
/// ```
/// use shard_router::map::MapLoader;
///
/// let loader = MapLoader::with_env_vars(
///     "SHARD_ROUTER",
///     [("SHARD_ROUTER__SHARDS__A__URL".to_owned(), "postgres://app:s3cret@db-a/app".to_owned())],
/// );
/// let map = loader.load_str("version = 1\n[shards.a]\nurl = \"postgres://placeholder/app\"").unwrap();
/// assert_eq!(map.shards()[0].redacted_url(), "postgres://app:***@db-a/app");
/// ```
#[derive(Debug, Clone)]
pub struct MapLoader {
    env: EnvOverrides,
}

#[derive(Debug, Clone)]
enum EnvOverrides {
    None,
    Process {
        prefix: String,
    },
    Given {
        prefix: String,
        vars: HashMap<String, String>,
    },
}

impl Default for MapLoader {
    fn default() -> Self {
        Self::new()
    }
}

impl MapLoader {
    /// A loader with overrides from the process environment, prefix `SHARD_ROUTER`.
    ///
    /// ```
    /// let _ = shard_router::map::MapLoader::new();
    /// ```
    pub fn new() -> Self {
        Self::with_env_prefix(DEFAULT_ENV_PREFIX)
    }

    /// A loader with overrides from the process environment under `prefix`.
    ///
    /// ```
    /// let _ = shard_router::map::MapLoader::with_env_prefix("BILLING_SHARDS");
    /// ```
    pub fn with_env_prefix(prefix: &str) -> Self {
        MapLoader {
            env: EnvOverrides::Process {
                prefix: prefix.to_owned(),
            },
        }
    }

    /// A loader whose overrides come from `vars` instead of the process environment.
    ///
    /// ```
    /// let _ = shard_router::map::MapLoader::with_env_vars("SR", std::iter::empty());
    /// ```
    pub fn with_env_vars(prefix: &str, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        MapLoader {
            env: EnvOverrides::Given {
                prefix: prefix.to_owned(),
                vars: vars.into_iter().collect(),
            },
        }
    }

    /// A loader that ignores the environment.
    ///
    /// ```
    /// let _ = shard_router::map::MapLoader::without_env();
    /// ```
    pub fn without_env() -> Self {
        MapLoader {
            env: EnvOverrides::None,
        }
    }

    /// Reads, parses and validates the map at `path`.
    ///
    /// ```no_run
    /// let map = shard_router::map::MapLoader::new().load_file("shard-map.toml").unwrap();
    /// ```
    pub fn load_file(&self, path: impl AsRef<Path>) -> Result<ShardMap, MapError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|cause| MapError::Read {
            path: path.display().to_string(),
            cause,
        })?;
        self.load(&text, &path.display().to_string())
    }

    /// Parses and validates a map given as TOML text.
    ///
    /// ```
    /// let map = shard_router::map::MapLoader::without_env()
    ///     .load_str("version = 1\n[shards.a]\nurl = \"postgres://h/a\"").unwrap();
    /// assert_eq!(map.version(), 1);
    /// ```
    pub fn load_str(&self, toml: &str) -> Result<ShardMap, MapError> {
        self.load(toml, "text")
    }

    /// Parses and validates a map given as JSON, the form the control database
    /// keeps for routers (same fields as the TOML; about 3× faster to parse).
    ///
    /// ```
    /// let map = shard_router::map::MapLoader::without_env()
    ///     .load_json(r#"{"version": 2, "shards": {"a": {"url": "postgres://h/a"}}}"#).unwrap();
    /// assert_eq!(map.version(), 2);
    /// ```
    pub fn load_json(&self, json: &str) -> Result<ShardMap, MapError> {
        let raw = serde_json::from_str(json).map_err(|e| MapError::Parse {
            origin: "json".to_owned(),
            cause: without_values(&e.to_string()),
        })?;
        self.finish(raw, "json")
    }

    fn load(&self, toml: &str, origin: &str) -> Result<ShardMap, MapError> {
        // The TOML goes straight to serde through the `toml` crate (the parser
        // `config` itself uses): `config`'s generic value tree costs about 7 µs
        // per pin, 7 s for a million pins, against under 1 s this way.
        if let Some((rest, pins)) = super::plain_pins::split(toml) {
            if let Ok(mut raw) = toml::from_str::<RawMap>(&rest) {
                if raw.set_pins(pins) {
                    return self.finish(raw, origin);
                }
            }
        }
        let raw: RawMap = toml::from_str(toml).map_err(|e| MapError::Parse {
            origin: origin.to_owned(),
            cause: parse_error_without_source(toml, &e),
        })?;
        self.finish(raw, origin)
    }

    /// Applies environment overrides, then validates.
    fn finish(&self, mut raw: RawMap, origin: &str) -> Result<ShardMap, MapError> {
        if let Some(env) = self.environment() {
            let overrides: RawOverrides = Config::builder()
                .add_source(env)
                .build()
                .and_then(|c| c.try_deserialize())
                .map_err(|e| MapError::Parse {
                    origin: format!("environment overrides of {origin}"),
                    cause: without_values(&e.to_string()),
                })?;
            raw.apply(overrides)?;
        }
        raw.validate()
    }

    fn environment(&self) -> Option<Environment> {
        let build = |prefix: &str| {
            Environment::with_prefix(prefix)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
        };
        match &self.env {
            EnvOverrides::None => None,
            EnvOverrides::Process { prefix } => Some(build(prefix)),
            EnvOverrides::Given { prefix, vars } => Some(build(prefix).source(Some(vars.clone()))),
        }
    }
}

/// The parser's message with the line and column, never the offending source
/// line (the `toml` crate's `Display` quotes it, and it may hold a password).
fn parse_error_without_source(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(
                "line {line}, column {column}: {}",
                without_values(e.message())
            )
        }
        None => without_values(e.message()),
    }
}

/// A deserializer's message with every quoted value elided: serde quotes the
/// value it could not take (`invalid type: string "postgres://app:S3cret@…",
/// expected struct RawShard`), and a value in a map may be a URL with its
/// password. Field names (serde quotes them with backticks) stay.
fn without_values(message: &str) -> String {
    // serde names an unknown enum variant in backticks: the value, too.
    const VARIANT: &str = "unknown variant `";
    let mut message = message.to_owned();
    if let Some(at) = message.find(VARIANT) {
        let start = at + VARIANT.len();
        if let Some(len) = message[start..].find('`') {
            message.replace_range(start..start + len, "…");
        }
    }
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '"' {
            // Skip to the closing quote (serde writes the value with Rust's
            // escapes, so `\"` does not close it).
            let mut escaped = false;
            for c in chars.by_ref() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => break,
                    _ => escaped = false,
                }
            }
            out.push_str("…\"");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_parse_error_never_echoes_the_source_line() {
        let text = "version = 1\n[shards.a]\nurl = \"postgres://app:s3cret@db/a\" oops\n";
        let err = super::MapLoader::without_env()
            .load_str(text)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn a_type_error_never_echoes_the_value() {
        // A shard given as a bare URL string: the value is in serde's message.
        let text = "version = 1\n[shards]\na = \"postgres://app:S3cret@db/a\"\n";
        let err = super::MapLoader::without_env()
            .load_str(text)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("S3cret"), "{err}");
        assert!(err.contains("invalid type"), "{err}");
        let json = r#"{"version": 1, "shards": {"a": "postgres://app:S3cret@db/a"}}"#;
        let err = super::MapLoader::without_env()
            .load_json(json)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("S3cret"), "{err}");
        let vars = vars(&[("SR__SHARDS__A__POOL__MAX_SIZE", "S3cret")]);
        let err = super::MapLoader::with_env_vars("SR", vars)
            .load_str(FILE)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("S3cret"), "{err}");
        let err = super::MapLoader::without_env()
            .load_str("version = 1\ntenant_case = \"postgres://app:S3cret@db\"\n[shards.a]\nurl = \"postgres://h/a\"\n")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("S3cret"), "{err}");
        assert_eq!(
            super::without_values(
                "unknown variant `postgres://a:S3cret@h`, expected `exact` or `lower`"
            ),
            "unknown variant `…`, expected `exact` or `lower`"
        );
        assert_eq!(
            super::without_values(r#"invalid type: string "a\"b", expected `url`"#),
            r#"invalid type: string "…", expected `url`"#
        );
    }

    use super::*;

    const FILE: &str = "version = 1\n[shards.a]\nurl = \"postgres://h/a\"\n";

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_overrides_change_declared_shards() {
        let map = MapLoader::with_env_vars(
            "SR",
            vars(&[
                ("SR__SHARDS__A__URL", "postgres://other/a"),
                ("SR__SHARDS__A__WEIGHT", "3"),
            ]),
        )
        .load_str(FILE)
        .unwrap();
        assert_eq!(map.shards()[0].url(), "postgres://other/a");
        assert_eq!(map.shards()[0].weight(), 3);
    }

    #[test]
    fn environment_overrides_reach_admin_urls_and_declared_replicas_only() {
        let file = "version = 1\n[shards.a]\nurl = \"postgres://h/a\"\n\
                    replicas = [{ url = \"postgres://r0/a\" }, { url = \"postgres://r1/a\" }]\n";
        let map = MapLoader::with_env_vars(
            "SR",
            vars(&[
                ("SR__SHARDS__A__ADMIN_URL", "postgres://admin:pw@h/a"),
                (
                    "SR__SHARDS__A__REPLICAS__1__URL",
                    "postgres://app:s3cret@r1/a",
                ),
                ("SR__SHARDS__A__REPLICAS__1__POOL__MAX_SIZE", "4"),
                ("SR__SHARDS__A__REPLICAS__7__URL", "postgres://nowhere/a"),
                ("SR__SHARDS__A__MAX_REPLICA_LAG_MS", "250"),
            ]),
        )
        .load_str(file)
        .unwrap();
        let shard = &map.shards()[0];
        assert_eq!(shard.admin_url(), Some("postgres://admin:pw@h/a"));
        assert_eq!(
            shard.replicas().len(),
            2,
            "an override never adds a replica"
        );
        assert_eq!(shard.replicas()[0].url(), "postgres://r0/a");
        assert_eq!(shard.replicas()[1].url(), "postgres://app:s3cret@r1/a");
        assert_eq!(shard.replicas()[1].pool().max_size, 4);
        assert_eq!(shard.max_replica_lag().as_millis(), 250);
    }

    #[test]
    fn environment_cannot_invent_a_shard_and_a_leftover_one_is_ignored() {
        // A variable left over for shard b (removed from the map): the map
        // loads as the file says, without b, and routers keep working.
        let map = MapLoader::with_env_vars("SR", vars(&[("SR__SHARDS__B__URL", "postgres://x/b")]))
            .load_str(FILE)
            .unwrap();
        assert!(map.shard_index("b").is_none());
        assert_eq!(map.shards().len(), 1);
        // A typo in a key of a declared shard is still refused.
        let err =
            MapLoader::with_env_vars("SR", vars(&[("SR__SHARDS__A__URLL", "postgres://x/a")]))
                .load_str(FILE)
                .unwrap_err();
        assert!(err.to_string().contains("urll"), "{err}");
    }

    #[test]
    fn a_bad_override_is_reported_like_a_bad_file() {
        let err = MapLoader::with_env_vars("SR", vars(&[("SR__SHARDS__A__URL", "nonsense://")]))
            .load_str(FILE)
            .unwrap_err();
        assert!(err.to_string().contains("shards.a.url"), "{err}");
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let err = MapLoader::without_env()
            .load_file("/nonexistent/map.toml")
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/map.toml"), "{err}");
    }

    #[test]
    fn a_misspelled_override_is_refused() {
        let err =
            MapLoader::with_env_vars("SR", vars(&[("SR__SHARDS__A__URLL", "postgres://x/a")]))
                .load_str(FILE)
                .unwrap_err();
        assert!(matches!(err, MapError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("urll"), "{err}");
    }

    #[test]
    fn overrides_reach_pool_settings_and_scalars() {
        let map = MapLoader::with_env_vars(
            "SR",
            vars(&[("SR__VERSION", "9"), ("SR__SHARDS__A__POOL__MAX_SIZE", "3")]),
        )
        .load_str(FILE)
        .unwrap();
        assert_eq!(map.version(), 9);
        assert_eq!(map.shards()[0].pool().max_size, 3);
    }
}
