//! Schema migrations on every shard.
//!
//! A migrations folder holds SQL files named `V{version}__{name}.sql`, versions
//! 1, 2, 3, ... without gaps or repeats. [`migrate`] brings every shard of a map
//! to the latest version, each file in its own transaction, tracked per shard in
//! the table [`HISTORY_TABLE`] (version, name, applied_on, checksum), using
//! [refinery]'s runner. A session advisory lock per shard keeps two concurrent
//! runs from applying a file twice. A shard that fails stops at its last good
//! version and does not stop the others.
//!
//! # Example
//!
//! ```no_run
//! use shard_router::migrate::{self, Migrations};
//! use shard_router::ShardMap;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let map = ShardMap::from_file("shard-map.toml")?;
//! let migrations = Migrations::load("migrations/notes")?;
//! for report in migrate::migrate(&map, &migrations, |_shard, _file| {}).await {
//!     match &report.outcome {
//!         Ok(version) => println!("{}: at version {version}", report.shard),
//!         Err(e) => eprintln!("{e}"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! [refinery]: https://docs.rs/refinery

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use refinery::{Migration, Runner, Target};
use tokio_postgres::Client;

use crate::map::ShardMap;
use crate::pg::lock_keys;
pub use crate::pg::{BoxError, ShardError};

/// The table on each shard that records applied migrations.
pub const HISTORY_TABLE: &str = "shard_router_migrations";

/// The ordered SQL files of a migrations folder.
#[derive(Clone)]
pub struct Migrations {
    files: Vec<MigrationFile>,
    /// Where applied versions are recorded.
    table: &'static str,
    /// How long a statement may wait for a table lock before the file is
    /// rolled back and tried again, and how many times it is tried.
    lock_timeout: Duration,
    lock_attempts: u32,
}

/// Default [`Migrations::lock_timeout`]: 2 s, 5 attempts.
const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_LOCK_ATTEMPTS: u32 = 5;

/// One migration file.
#[derive(Clone)]
pub struct MigrationFile {
    /// Its version (from `V{version}__`).
    pub version: u32,
    /// Its name (after `__`).
    pub name: String,
    /// Where it was read from.
    pub path: PathBuf,
    migration: Migration,
}

impl MigrationFile {
    /// `V{version}__{name}`.
    ///
    /// ```no_run
    /// # let m = shard_router::migrate::Migrations::load("migrations/notes").unwrap();
    /// assert_eq!(m.files()[0].label(), "V1__notes");
    /// ```
    pub fn label(&self) -> String {
        format!("V{}__{}", self.version, self.name)
    }

    /// The checksum recorded when the file is applied (refinery's: SipHash-1-3
    /// over name, version and SQL).
    ///
    /// ```no_run
    /// # let m = shard_router::migrate::Migrations::load("migrations/notes").unwrap();
    /// let _ = m.files()[0].checksum();
    /// ```
    pub fn checksum(&self) -> u64 {
        self.migration.checksum()
    }
}

impl fmt::Debug for MigrationFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MigrationFile")
            .field("version", &self.version)
            .field("name", &self.name)
            .field("path", &self.path)
            .finish()
    }
}

impl fmt::Debug for Migrations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.files).finish()
    }
}

/// Why a migrations folder cannot be used. Nothing runs anywhere.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FolderError {
    /// The folder or a file in it cannot be read.
    #[error("cannot read {path}: {cause}")]
    Read {
        /// The folder or file.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// A `.sql` file is not named `V{version}__{name}.sql`.
    #[error(
        "{path}: migration files are named V{{version}}__{{name}}.sql (name: letters, digits, _)"
    )]
    BadName {
        /// The file.
        path: PathBuf,
    },
    /// Two files share a version.
    #[error("version {version} is used twice: {first} and {second}")]
    Duplicate {
        /// The version.
        version: u32,
        /// One file.
        first: PathBuf,
        /// The other.
        second: PathBuf,
    },
    /// Versions skip a number.
    #[error("versions must go 1, 2, 3, ... without gaps: version {missing} is missing")]
    Gap {
        /// The first missing version.
        missing: u32,
    },
    /// The folder has no migration files.
    #[error("{path} holds no migration files (V{{version}}__{{name}}.sql)")]
    Empty {
        /// The folder.
        path: PathBuf,
    },
    /// A file controls its own transaction. Each file runs in one transaction
    /// that `migrate` commits or rolls back; a `COMMIT` inside it would apply
    /// part of the file and leave the shard between versions.
    #[error("{path}: statement {statement} is `{keyword}`; migration files run in one transaction each and may not begin, commit or roll back their own (split the file instead)")]
    TransactionControl {
        /// The file.
        path: PathBuf,
        /// The statement's position in the file, from 1.
        statement: usize,
        /// The keyword found.
        keyword: String,
    },
}

/// The first transaction-control statement of `sql` (`BEGIN`, `START`,
/// `COMMIT`, `END`, `ROLLBACK`, `ABORT`, `SAVEPOINT`, `RELEASE`, `PREPARE
/// TRANSACTION`), as (statement number from 1, keyword). Strings, quoted
/// identifiers, comments and dollar-quoted bodies (where a function's `BEGIN`
/// and `END` live) are skipped.
fn transaction_control(sql: &str) -> Option<(usize, String)> {
    let bytes = sql.as_bytes();
    let mut i = 0;
    let mut statement = 1;
    let mut at_start = true;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                // Block comments nest in Postgres.
                let mut depth = 0;
                while i < bytes.len() {
                    if bytes[i] == b'/' && bytes.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                continue;
            }
            b'\'' | b'"' => {
                // In an escape string (`E'...'`, the E not ending a longer
                // word) a backslash escapes the next character, `\'` included.
                let escapes = c == b'\''
                    && i >= 1
                    && matches!(bytes[i - 1], b'E' | b'e')
                    && (i < 2 || !(bytes[i - 2].is_ascii_alphanumeric() || bytes[i - 2] == b'_'));
                at_start = false;
                i += 1;
                while i < bytes.len() {
                    if escapes && bytes[i] == b'\\' {
                        i += 2;
                    } else if bytes[i] == c && bytes.get(i + 1) == Some(&c) {
                        i += 2; // a doubled quote stands for one, in either kind
                    } else if bytes[i] == c {
                        break;
                    } else {
                        i += 1;
                    }
                }
                i += 1;
                continue;
            }
            // `$` inside an identifier (`price$usd`) is just a character.
            b'$' if i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_') => {
                i += 1;
                continue;
            }
            b'$' => {
                // $tag$ ... $tag$ (tag: letters, digits, _; may be empty).
                let tag_end = bytes[i + 1..]
                    .iter()
                    .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
                    .map(|n| i + 1 + n);
                if let Some(end) = tag_end.filter(|e| bytes.get(*e) == Some(&b'$')) {
                    let tag = &sql[i..=end];
                    at_start = false;
                    match sql[end + 1..].find(tag) {
                        Some(close) => i = end + 1 + close + tag.len(),
                        None => i = bytes.len(),
                    }
                    continue;
                }
                i += 1;
                continue;
            }
            b';' => {
                statement += 1;
                at_start = true;
                i += 1;
                continue;
            }
            c if c.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            c if at_start && c.is_ascii_alphabetic() => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                let word = sql[start..i].to_ascii_uppercase();
                at_start = false;
                let control = matches!(
                    word.as_str(),
                    "BEGIN"
                        | "START"
                        | "COMMIT"
                        | "END"
                        | "ROLLBACK"
                        | "ABORT"
                        | "SAVEPOINT"
                        | "RELEASE"
                ) || (word == "PREPARE"
                    && sql[i..]
                        .trim_start()
                        .to_ascii_uppercase()
                        .starts_with("TRANSACTION"));
                if control {
                    return Some((statement, word));
                }
                continue;
            }
            _ => {
                at_start = false;
                i += 1;
            }
        }
    }
    None
}

impl Migrations {
    /// Reads `dir` (not its subfolders). Refuses badly named `.sql` files,
    /// repeated versions and gaps; other files are ignored.
    ///
    /// ```no_run
    /// let migrations = shard_router::migrate::Migrations::load("migrations/notes").unwrap();
    /// println!("latest version: {}", migrations.latest());
    /// ```
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, FolderError> {
        let dir = dir.as_ref();
        let read = |path: &Path, cause| FolderError::Read {
            path: path.to_owned(),
            cause,
        };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| read(dir, e))? {
            let path = entry.map_err(|e| read(dir, e))?.path();
            if path.is_file() && path.extension().is_some_and(|ext| ext == "sql") {
                paths.push(path);
            }
        }
        let mut files = Vec::with_capacity(paths.len());
        for path in paths {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_owned();
            let bad_name = || FolderError::BadName { path: path.clone() };
            // refinery's own name check is a prefix match; insist on the whole stem.
            let (version, name) = stem
                .strip_prefix('V')
                .and_then(|rest| rest.split_once("__"))
                .filter(|(v, n)| {
                    !v.is_empty()
                        && v.bytes().all(|b| b.is_ascii_digit())
                        && !n.is_empty()
                        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                })
                .ok_or_else(bad_name)?;
            let version: u32 = version.parse().map_err(|_| bad_name())?;
            let sql = std::fs::read_to_string(&path).map_err(|e| read(&path, e))?;
            if let Some((statement, keyword)) = transaction_control(&sql) {
                return Err(FolderError::TransactionControl {
                    path,
                    statement,
                    keyword,
                });
            }
            let migration = Migration::unapplied(&stem, &sql).map_err(|_| bad_name())?;
            files.push(MigrationFile {
                version,
                name: name.to_owned(),
                path,
                migration,
            });
        }
        if files.is_empty() {
            return Err(FolderError::Empty {
                path: dir.to_owned(),
            });
        }
        files.sort_by(|a, b| (a.version, &a.path).cmp(&(b.version, &b.path)));
        for pair in files.windows(2) {
            if pair[0].version == pair[1].version {
                return Err(FolderError::Duplicate {
                    version: pair[0].version,
                    first: pair[0].path.clone(),
                    second: pair[1].path.clone(),
                });
            }
        }
        for (expected, file) in (1..).zip(&files) {
            if file.version != expected {
                return Err(FolderError::Gap { missing: expected });
            }
        }
        Ok(Migrations {
            files,
            table: HISTORY_TABLE,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            lock_attempts: DEFAULT_LOCK_ATTEMPTS,
        })
    }

    /// Migrations compiled into the binary (the control schema), recorded in `table`.
    pub(crate) fn embedded(table: &'static str, files: &[(&str, &str)]) -> Self {
        let files = files
            .iter()
            .zip(1..)
            .map(|((stem, sql), version)| MigrationFile {
                version,
                name: stem.split_once("__").map_or(*stem, |(_, n)| n).to_owned(),
                path: PathBuf::from(format!("{stem}.sql")),
                migration: Migration::unapplied(stem, sql).expect("embedded names are valid"),
            })
            .collect();
        Migrations {
            files,
            table,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            lock_attempts: DEFAULT_LOCK_ATTEMPTS,
        }
    }

    /// How long each statement may wait for a lock (default 2 s) and how many
    /// times a file is tried (default 5). An `ALTER TABLE` queued behind a long
    /// transaction would otherwise stall every query on that table, and so
    /// every tenant of the shard, until the transaction ends; with a timeout the
    /// file is rolled back after `timeout`, the queue drains, and it is tried
    /// again after the same pause.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// let m = shard_router::migrate::Migrations::load("migrations/notes")
    ///     .unwrap()
    ///     .lock_timeout(Duration::from_millis(500), 10);
    /// ```
    pub fn lock_timeout(mut self, timeout: Duration, attempts: u32) -> Self {
        self.lock_timeout = timeout.max(Duration::from_millis(1));
        self.lock_attempts = attempts.max(1);
        self
    }

    /// The files, by version.
    ///
    /// ```no_run
    /// # let m = shard_router::migrate::Migrations::load("migrations/notes").unwrap();
    /// for file in m.files() { println!("{}", file.label()); }
    /// ```
    pub fn files(&self) -> &[MigrationFile] {
        &self.files
    }

    /// The highest version.
    ///
    /// ```no_run
    /// # let m = shard_router::migrate::Migrations::load("migrations/notes").unwrap();
    /// assert!(m.latest() >= 1);
    /// ```
    pub fn latest(&self) -> u32 {
        self.files.last().map_or(0, |f| f.version)
    }

    fn runner(&self, target: u32) -> Runner {
        let all: Vec<Migration> = self.files.iter().map(|f| f.migration.clone()).collect();
        let mut runner = Runner::new(&all)
            .set_grouped(false)
            .set_abort_divergent(true)
            .set_abort_missing(true)
            .set_target(Target::Version(target as i32));
        runner.set_migration_table_name(self.table);
        runner
    }
}

/// Where one shard stands.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShardStatus {
    /// The shard.
    pub shard: String,
    /// The highest applied version (0: none).
    pub version: u32,
    /// Versions in the folder not applied yet.
    pub pending: Vec<u32>,
}

/// The result of migrating one shard.
#[derive(Debug)]
pub struct ShardReport {
    /// The shard.
    pub shard: String,
    /// Versions applied by this run.
    pub applied: Vec<u32>,
    /// The shard's version at the end, or what stopped it.
    pub outcome: Result<u32, ShardError>,
}

/// As `shardctl --json migrate` prints it: `shard`, `applied`, and `version`
/// or `error` with its [`ShardError::kind`].
impl serde::Serialize for ShardReport {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut report = serializer.serialize_struct("ShardReport", 5)?;
        report.serialize_field("shard", &self.shard)?;
        report.serialize_field("applied", &self.applied)?;
        report.serialize_field("version", &self.outcome.as_ref().ok())?;
        let err = self.outcome.as_ref().err();
        report.serialize_field("error", &err.map(ToString::to_string))?;
        report.serialize_field("kind", &err.map(ShardError::kind))?;
        report.end()
    }
}

/// Reads the shard's history and checks it against the folder.
async fn shard_status(
    shard: &str,
    client: &mut Client,
    migrations: &Migrations,
) -> Result<ShardStatus, ShardError> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&migrations.table])
        .await
        .map_err(|e| ShardError::database(shard, e))?
        .get(0);
    let applied = if exists {
        migrations
            .runner(migrations.latest())
            .get_applied_migrations_async(client)
            .await
            .map_err(|e| ShardError::database(shard, e))?
    } else {
        Vec::new()
    };
    for done in &applied {
        let label = format!("V{}__{}", done.version(), done.name());
        match migrations
            .files
            .iter()
            .find(|f| f.version as i64 == done.version() as i64)
        {
            None => {
                return Err(ShardError::Missing {
                    shard: shard.to_owned(),
                    file: label,
                })
            }
            Some(file) if file.checksum() != done.checksum() || file.name != done.name() => {
                return Err(ShardError::Drift {
                    shard: shard.to_owned(),
                    file: label,
                    applied: done.checksum(),
                    current: file.checksum(),
                })
            }
            Some(_) => {}
        }
    }
    let version = applied
        .iter()
        .map(|m| m.version().max(0) as u32)
        .max()
        .unwrap_or(0);
    Ok(ShardStatus {
        shard: shard.to_owned(),
        version,
        pending: migrations
            .files
            .iter()
            .map(|f| f.version)
            .filter(|v| *v > version)
            .collect(),
    })
}

/// Where every shard of `map` stands against `migrations`, without changing anything.
///
/// ```no_run
/// # use shard_router::{migrate::{self, Migrations}, ShardMap};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// # let map = ShardMap::from_file("shard-map.toml").unwrap();
/// # let migrations = Migrations::load("migrations/notes").unwrap();
/// for (shard, status) in migrate::status(&map, &migrations).await {
///     println!("{shard}: {status:?}");
/// }
/// # }
/// ```
pub async fn status(
    map: &ShardMap,
    migrations: &Migrations,
) -> Vec<(String, Result<ShardStatus, ShardError>)> {
    let mut out = Vec::with_capacity(map.shards().len());
    for shard in map.shards() {
        let status = match shard.connect_admin().await {
            Ok(mut client) => shard_status(shard.name(), &mut client, migrations).await,
            Err(e) => Err(e),
        };
        out.push((shard.name().to_owned(), status));
    }
    out
}

/// Brings every shard of `map` to the latest version of `migrations`.
///
/// Each shard's database first gets the shard's identity
/// (`shard_router_identity`: its name and a UUID) unless it has one (another
/// shard's is logged; a publish refuses to point this shard at it). Shards
/// are migrated one after another;
/// `on_applied` is called after each
/// file applied on a shard (for progress bars). A shard that is unreachable,
/// has drifted, or fails a file is reported and skipped; the others go on.
/// Running it again finishes what an earlier run could not.
///
/// ```no_run
/// # use shard_router::{migrate::{self, Migrations}, ShardMap};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// # let map = ShardMap::from_file("shard-map.toml").unwrap();
/// # let migrations = Migrations::load("migrations/notes").unwrap();
/// let reports = migrate::migrate(&map, &migrations, |shard, file| {
///     println!("{shard}: applied {}", file.label());
/// }).await;
/// assert!(reports.iter().all(|r| r.outcome.is_ok()));
/// # }
/// ```
pub async fn migrate(
    map: &ShardMap,
    migrations: &Migrations,
    mut on_applied: impl FnMut(&str, &MigrationFile),
) -> Vec<ShardReport> {
    let mut reports = Vec::with_capacity(map.shards().len());
    for shard in map.shards() {
        let mut applied = Vec::new();
        let outcome = match shard.connect_admin().await {
            // The database takes the shard's identity first (or is refused
            // as another shard's): a publish later checks URLs against it.
            Ok(mut client) => match crate::control::identity::ensure(&client, shard.name()).await {
                Ok(identity) => {
                    if identity.shard != shard.name() {
                        // Migrating is the same on any shard; a publish that
                        // points this name here is what gets refused.
                        tracing::warn!(shard = shard.name(), claims = %identity.shard,
                            "this database is another shard's (shard_router_identity)");
                    }
                    apply_pending(
                        shard.name(),
                        &mut client,
                        migrations,
                        &mut applied,
                        &mut on_applied,
                    )
                    .await
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        reports.push(ShardReport {
            shard: shard.name().to_owned(),
            applied,
            outcome,
        });
    }
    reports
}

/// Applies what `client`'s database lacks, under the migration lock.
pub(crate) async fn apply_pending(
    shard: &str,
    client: &mut Client,
    migrations: &Migrations,
    applied: &mut Vec<u32>,
    on_applied: &mut impl FnMut(&str, &MigrationFile),
) -> Result<u32, ShardError> {
    // Held for the whole shard: a concurrent run waits here, then finds nothing pending.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&lock_keys::migrate()])
        .await
        .map_err(|e| ShardError::database(shard, e))?;
    let result = async {
        let status = shard_status(shard, client, migrations).await?;
        if !status.pending.is_empty() {
            let tenants = crate::moves::fence::moving_tenants(client)
                .await
                .map_err(|e| ShardError::database(shard, e))?;
            if !tenants.is_empty() {
                return Err(ShardError::MoveInFlight {
                    shard: shard.to_owned(),
                    tenants,
                });
            }
        }
        let mut version = status.version;
        let timeout_ms = migrations.lock_timeout.as_millis() as u64;
        client
            .batch_execute(&format!("SET lock_timeout = {timeout_ms}"))
            .await
            .map_err(|e| ShardError::database(shard, e))?;
        for target in status.pending {
            let file = &migrations.files[target as usize - 1];
            let mut attempt = 1;
            while let Err(e) = migrations.runner(target).run_async(client).await {
                if !is_lock_timeout(&e) {
                    return Err(ShardError::Failed {
                        shard: shard.to_owned(),
                        file: file.label(),
                        version,
                        cause: e.into(),
                    });
                }
                if attempt == migrations.lock_attempts {
                    return Err(ShardError::LockTimeout {
                        shard: shard.to_owned(),
                        file: file.label(),
                        version,
                        attempts: attempt,
                        timeout_ms,
                        cause: e.into(),
                    });
                }
                tracing::warn!(shard, file = %file.label(), attempt, "lock timeout; rolled back, trying again");
                tokio::time::sleep(migrations.lock_timeout).await;
                attempt += 1;
            }
            version = target;
            applied.push(target);
            on_applied(shard, file);
        }
        Ok(version)
    }
    .await;
    // Closing the session would release the lock too; unlock to be tidy.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&lock_keys::migrate()])
        .await;
    let _ = client.batch_execute("RESET lock_timeout").await;
    result
}

/// Whether a statement of the error's chain gave up waiting for a lock.
fn is_lock_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(db) = e.downcast_ref::<tokio_postgres::error::DbError>() {
            return db.code() == &tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE;
        }
        current = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(files: &[(&str, &str)]) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sr-migrations-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, sql) in files {
            std::fs::write(dir.join(name), sql).unwrap();
        }
        dir
    }

    #[test]
    fn loads_in_version_order() {
        let dir = folder(&[
            ("V2__b.sql", "SELECT 2"),
            ("V1__a.sql", "SELECT 1"),
            ("README.md", "ignored"),
        ]);
        let m = Migrations::load(&dir).unwrap();
        let labels: Vec<_> = m.files().iter().map(|f| f.label()).collect();
        assert_eq!(labels, ["V1__a", "V2__b"]);
        assert_eq!(m.latest(), 2);
    }

    #[test]
    fn transaction_control_is_found_outside_strings_comments_and_bodies() {
        use super::transaction_control;
        assert_eq!(
            transaction_control("CREATE TABLE t (a int);\nCOMMIT;\nINSERT INTO t VALUES (1);"),
            Some((2, "COMMIT".into()))
        );
        assert_eq!(
            transaction_control("begin; create table t (a int);"),
            Some((1, "BEGIN".into()))
        );
        assert_eq!(
            transaction_control("PREPARE TRANSACTION 'x';"),
            Some((1, "PREPARE".into()))
        );
        // Issue 26.9: `\'` does not end an escape string, so the COMMIT
        // after it is found; in a plain string a backslash is just a character.
        assert_eq!(
            transaction_control("SELECT E'it\\'s'; COMMIT;"),
            Some((2, "COMMIT".into()))
        );
        assert_eq!(
            transaction_control("SELECT 'C:\\'; COMMIT;"),
            Some((2, "COMMIT".into()))
        );
        assert_eq!(
            transaction_control("SELECT e'a\\\\'; ROLLBACK;"),
            Some((2, "ROLLBACK".into()))
        );
        assert_eq!(
            transaction_control("INSERT INTO t VALUES (E'It''s Bob\\'s');\nCOMMIT;"),
            Some((2, "COMMIT".into()))
        );
        assert_eq!(
            transaction_control("SELECT price$usd$ FROM t; COMMIT;"),
            Some((2, "COMMIT".into()))
        );
        for fine in [
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$\nBEGIN\n  PERFORM 1;\nEND $$;",
            "CREATE FUNCTION g() RETURNS void LANGUAGE plpgsql AS $body$ BEGIN COMMIT; END $body$;",
            "INSERT INTO t VALUES ('COMMIT; BEGIN');",
            "-- COMMIT;\nCREATE TABLE \"commit\" (a int); /* ROLLBACK; */",
            "DO $$ BEGIN END $$; CREATE INDEX i ON t (a);",
            "PREPARE q AS SELECT 1;",
            "SELECT E'it\\'s; COMMIT; x';",
            "/* outer /* inner */ COMMIT; */ SELECT 1;",
        ] {
            assert_eq!(transaction_control(fine), None, "{fine}");
        }
    }

    #[test]
    fn refuses_gaps_repeats_bad_names_and_empty_folders() {
        let gap = Migrations::load(folder(&[("V1__a.sql", ""), ("V3__c.sql", "")])).unwrap_err();
        assert!(matches!(gap, FolderError::Gap { missing: 2 }), "{gap}");
        let twice = Migrations::load(folder(&[("V1__a.sql", ""), ("V1__b.sql", "")])).unwrap_err();
        assert!(
            matches!(twice, FolderError::Duplicate { version: 1, .. }),
            "{twice}"
        );
        let bad = Migrations::load(folder(&[("V1_a.sql", "")])).unwrap_err();
        assert!(matches!(bad, FolderError::BadName { .. }), "{bad}");
        let bad = Migrations::load(folder(&[("V1__a-b.sql", "")])).unwrap_err();
        assert!(matches!(bad, FolderError::BadName { .. }), "{bad}");
        let empty = Migrations::load(folder(&[])).unwrap_err();
        assert!(matches!(empty, FolderError::Empty { .. }), "{empty}");
        let zero = Migrations::load(folder(&[("V0__a.sql", "")])).unwrap_err();
        assert!(matches!(zero, FolderError::Gap { missing: 1 }), "{zero}");
    }
}
