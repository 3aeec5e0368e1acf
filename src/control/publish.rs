//! Publishing a map version: validate, diff, refuse silent re-homing, insert.

use std::collections::BTreeMap;

use super::{ControlError, ControlPlane, RehomeError, Rehomed};
use crate::map::{MapDiff, MapDocument, MapLoader};
use crate::MapError;

/// How to publish.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct PublishOptions {
    /// Stored with the version, shown by `map history`.
    pub note: Option<String>,
    /// Pin tenants that the new map would re-home where their data is, instead of refusing.
    pub pin_existing: bool,
    /// Check everything, print the plan, publish nothing.
    pub dry_run: bool,
    /// The operator says that a database a shard's URL now points at (one
    /// without that shard's identity, or another shard's) holds that shard's
    /// data: its identity is rewritten instead of the publish being refused.
    pub reassign: bool,
    /// The mover publishing a change of its own move entry.
    pub(crate) mover: Option<MoverPublish>,
}

/// Who publishes a move's map change: the tenant, the lease's token and
/// holder, and the intent recorded for the change. The publish is refused
/// unless the move record still says all three.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MoverPublish {
    pub(crate) tenant: String,
    pub(crate) token: i64,
    pub(crate) holder: String,
    pub(crate) intent: String,
}

impl PublishOptions {
    /// Options with a note.
    ///
    /// ```
    /// let o = shard_router::control::PublishOptions::with_note("add shard c");
    /// assert_eq!(o.note.as_deref(), Some("add shard c"));
    /// ```
    pub fn with_note(note: &str) -> Self {
        PublishOptions {
            note: Some(note.to_owned()),
            ..Default::default()
        }
    }
}

/// What a publish did (or, on a dry run, would do). Serializes without the
/// TOML, as `shardctl --json map publish` prints it.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct Published {
    /// The version.
    pub version: u64,
    /// The change against the newest version before it (none for the first map).
    pub diff: Option<MapDiff>,
    /// Tenants pinned where their data is (`pin_existing`).
    pub pinned: Vec<Rehomed>,
    /// False on a dry run.
    pub published: bool,
    /// What the operator should know: URLs that carry a password (stored in
    /// the control database, where every router can read it; use
    /// `password_env` instead), rows `reassign` could not compare.
    pub warnings: Vec<String>,
    /// The TOML stored (with the added pins).
    #[serde(skip)]
    pub toml: String,
}

/// Why a map was not published. The control database is unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The map is invalid.
    #[error(transparent)]
    Invalid(#[from] MapError),
    /// Its version is not above the newest published one.
    #[error("map version {offered} is not higher than the newest published version {newest}; versions only go forward")]
    NotNewer {
        /// The newest version.
        newest: u64,
        /// The offered version.
        offered: u64,
    },
    /// The map would move tenants that have data without a move.
    #[error("refused: the map would re-home {} tenant(s) that have data, without a move: {}{}; pin them where they are (--pin-existing), or move them first",
        tenants.len(),
        tenants.iter().take(20).map(|r| format!("{} ({} -> {})", r.tenant, r.from, r.to)).collect::<Vec<_>>().join(", "),
        if tenants.len() > 20 { format!(" and {} more", tenants.len() - 20) } else { String::new() })]
    Rehoming {
        /// The tenants, with where their data is and where the map would send them.
        tenants: Vec<Rehomed>,
    },
    /// The shards' fences show tenants mid-move that the map does not: a move
    /// is finishing, or the control database was restored from a backup.
    #[error("refused: the shards' fences show {} mid-move, but the map has no move for them (a move finishing, or a control database restored from a backup?); finish or abort those moves (`shardctl tenant move TENANT --resume` or `--abort`), then publish", tenants.join(", "))]
    MovingOnShards {
        /// The tenants.
        tenants: Vec<String>,
    },
    /// A shard's fence requires a higher map version than the one offered
    /// (the control database was restored from a backup older than a move's
    /// last step): writes under this map would be refused there.
    #[error("refused: a shard's fence requires map version {needed} or later, above the offered {offered} (was the control database restored from a backup?); publish version {needed} or later")]
    FencesAhead {
        /// The version offered.
        offered: u64,
        /// The lowest version every fence accepts.
        needed: u64,
    },
    /// Which tenants have data could not be checked.
    #[error(transparent)]
    Check(#[from] RehomeError),
    /// The control database failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A stored or given map could not be rewritten (rollback, added pins).
    #[error("cannot rewrite the map's TOML: {0}")]
    Rewrite(String),
    /// The map would add, drop or change a move entry. Only the mover edits
    /// them: keep `[moves]` as in the newest version.
    #[error("refused: the map would add, drop or change the move entries of {}; only `shardctl tenant move` edits [moves]: copy them from the newest version (`shardctl map show`), or finish or abort the moves first", tenants.join(", "))]
    MovesChanged {
        /// The tenants whose entries differ.
        tenants: Vec<String>,
    },
    /// A shard the map adds lacks tables or columns the others have.
    #[error("refused: shard {} lacks {} column(s) that shard {} has: {}{}; apply the migrations to it first (`shardctl migrate --map NEW_MAP`), then publish", .0.shard, .0.missing.len(), .0.reference, .0.missing.iter().take(5).cloned().collect::<Vec<_>>().join(", "), if .0.missing.len() > 5 { ", ..." } else { "" })]
    SchemaMissing(super::SchemaGap),
    /// The new shards' schema could not be compared (a shard unreachable).
    #[error("cannot compare the new shards' schema with the others: {0}")]
    SchemaCheck(crate::migrate::ShardError),
    /// Live routers serve this version or a later one that the control
    /// database does not hold: it was restored from an older backup, or a
    /// router follows another control database.
    #[error("refused: router(s) {} serve version {} or later, which this control database does not hold (was it restored from a backup?); publish a version above {}, or, if those rows are not your routers' (reported through login {}), revoke that login (when no router of yours shares it) and `shardctl routers --forget INSTANCE`", routers.iter().map(|(id, v)| format!("{id} (v{v})")).collect::<Vec<_>>().join(", "), offered, routers.iter().map(|(_, v)| *v).max().unwrap_or(*offered), logins.join(", "))]
    RoutersAhead {
        /// The version offered.
        offered: u64,
        /// Each live router at or past it: instance id and version.
        routers: Vec<(String, u64)>,
        /// The logins that reported them.
        logins: Vec<String>,
    },
    /// Another version was published while this one was being checked; its
    /// checks ran against a map that is no longer the newest.
    #[error("refused: version {newest} was published while this map was checked against version {base}; check it again against the newest")]
    Concurrent {
        /// The version the checks ran against.
        base: u64,
        /// The newest version now.
        newest: u64,
    },
    /// A shard's URL points at a database that is another shard's, or at
    /// another database than the one the shard had (`shard_router_identity`).
    #[error("refused: shard {shard}: {reason}; fix its url, or, if that database now holds shard {shard}'s data, publish with --reassign")]
    ShardIdentity {
        /// The shard.
        shard: String,
        /// What the identities say.
        reason: String,
    },
    /// The mover no longer holds the move's lease, or the move record no
    /// longer records the intent of this change (a restored control database).
    #[error("refused: this mover no longer holds the lease of tenant {tenant}'s move, or the move no longer records this change's intent")]
    MoverFenced {
        /// The tenant.
        tenant: String,
    },
}

impl ControlPlane {
    /// Publishes `toml` as a new map version.
    ///
    /// In order: validates it (with this process's environment overrides),
    /// refuses a version not above the newest, diffs it against the newest,
    /// refuses it if tenants with data would change shard without a move (or
    /// pins them where they are with [`PublishOptions::pin_existing`]), and
    /// inserts it, which notifies every router. Any refusal leaves the control
    /// database unchanged.
    ///
    /// ```no_run
    /// # use shard_router::control::{ControlPlane, PublishOptions};
    /// # async fn f(mut c: ControlPlane) -> Result<(), Box<dyn std::error::Error>> {
    /// let toml = std::fs::read_to_string("shard-map.toml")?;
    /// let published = c.publish(&toml, &PublishOptions::with_note("add shard c")).await?;
    /// if let Some(diff) = &published.diff { print!("{diff}"); }
    /// # Ok(()) }
    /// ```
    pub async fn publish(
        &mut self,
        toml: &str,
        options: &PublishOptions,
    ) -> Result<Published, PublishError> {
        let mut toml = toml.to_owned();
        let mut new = MapLoader::new().load_str(&toml)?;
        let current = self.latest_opt().await?;
        let mut pinned = Vec::new();
        let mut old_map = None;
        let diff = match &current {
            // No map stored, yet routers serve one: the control database was
            // rebuilt or restored from before its first map. What they serve
            // is unknown here, so the shards' word decides: every tenant with
            // rows must be routed to them, and no fence may be ahead.
            None if self.base_is_suspect(0).await? => {
                let in_flight = self.unfinished_moves().await?;
                let truth =
                    super::rehoming::check_against_shards(&new, 0, true, &in_flight).await?;
                refuse_against_shards(&truth, new.version())?;
                pinned = pin_or_refuse(&mut toml, &mut new, truth.stranded, options.pin_existing)?;
                None
            }
            None => None,
            Some(stored) => {
                let old: &crate::ShardMap = old_map.insert(stored.load()?);
                if new.version() <= old.version() {
                    return Err(PublishError::NotNewer {
                        newest: old.version(),
                        offered: new.version(),
                    });
                }
                check_moves(&stored.toml, &toml, options.mover.as_ref())?;
                let mut rehomed = super::tenants_rehomed(old, &new).await?;
                // The shards' own word, whatever the stored base says: moves
                // their fences show must be in the map, and when the base is
                // suspect (a restored control database) every tenant with
                // rows must be routed to them.
                let suspect = self.base_is_suspect(old.version()).await?;
                // Moves the control database records as unfinished are in
                // flight (their fences may be moving before or after their
                // map entry); only a fence no record explains is refused.
                let in_flight = self.unfinished_moves().await?;
                let truth =
                    super::rehoming::check_against_shards(&new, old.version(), suspect, &in_flight)
                        .await?;
                refuse_against_shards(&truth, new.version())?;
                // Rows on a shard the tenant left in a move are a stale copy:
                // never a reason to refuse, nor a place to pin it (after a
                // restore, the stored base may still point there).
                rehomed.retain(|r| !truth.former.contains(&(r.tenant.clone(), r.from.clone())));
                for stranded in truth.stranded {
                    if !rehomed.iter().any(|r| r.tenant == stranded.tenant) {
                        rehomed.push(stranded);
                    }
                }
                pinned = pin_or_refuse(&mut toml, &mut new, rehomed, options.pin_existing)?;
                let gaps = super::schema_gaps(old, &new)
                    .await
                    .map_err(PublishError::SchemaCheck)?;
                if let Some(gap) = gaps.into_iter().next() {
                    return Err(PublishError::SchemaMissing(gap));
                }
                Some(MapDiff::between(old, &new))
            }
        };
        let identities = super::identity::check(old_map.as_ref(), &new, options.reassign)
            .await
            .map_err(|p| PublishError::ShardIdentity {
                shard: p.shard,
                reason: p.reason,
            })?;
        let mut warnings = passwords_in_urls(&new);
        warnings.extend(identities.warnings.iter().cloned());
        if !options.dry_run {
            self.insert(
                new.version(),
                &toml,
                options.note.as_deref(),
                current.as_ref().map(|c| c.version),
                options.mover.as_ref(),
            )
            .await?;
            // Only now: a publish refused above changed no shard.
            warnings.extend(identities.write().await);
        }
        Ok(Published {
            version: new.version(),
            diff,
            pinned,
            published: !options.dry_run,
            warnings,
            toml,
        })
    }

    /// Publishes the content of version `to` again, as a new version above the
    /// newest: versions only go forward. Goes through [`ControlPlane::publish`],
    /// so re-homing is refused here too.
    ///
    /// ```no_run
    /// # use shard_router::control::{ControlPlane, PublishOptions};
    /// # async fn f(mut c: ControlPlane) -> Result<(), Box<dyn std::error::Error>> {
    /// let published = c.rollback(4, &PublishOptions::default()).await?;
    /// println!("version {} routes like version 4", published.version);
    /// # Ok(()) }
    /// ```
    pub async fn rollback(
        &mut self,
        to: u64,
        options: &PublishOptions,
    ) -> Result<Published, PublishError> {
        let old = self
            .get(to)
            .await?
            .ok_or_else(|| PublishError::Rewrite(format!("version {to} was never published")))?;
        let newest = self.latest().await?.version;
        let toml = set_version(&old.toml, newest + 1)?;
        let mut options = options.clone();
        options
            .note
            .get_or_insert_with(|| format!("rollback to version {to}"));
        self.publish(&toml, &options).await
    }
}

/// What [`ControlPlane::pin_rollout_stragglers`] found and did.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[non_exhaustive]
pub struct Stragglers {
    /// Tenants that first wrote during the rollout, on the shard the version
    /// before placed them (a router still served it): pinned there.
    pub pinned: Vec<Rehomed>,
    /// Tenants with rows on both shards: written on the old placement during
    /// the rollout and on the new one after it. Neither shard holds all of
    /// their data; move or merge them by hand.
    pub split: Vec<Rehomed>,
    /// The follow-up version that pinned them, if one was published.
    pub published: Option<u64>,
}

impl ControlPlane {
    /// Run once every router has applied `version` (`map publish --wait`):
    /// the data check ran when `version` was published, but a router still
    /// on the version before could give a tenant with no data yet its first
    /// rows on the shard that version placed it on. Such tenants are pinned
    /// there in a follow-up version (checked like any publish); tenants that
    /// also have rows where `version` places them are reported as split.
    /// Nothing is published when `version` is no longer the newest.
    ///
    /// ```no_run
    /// # async fn f(mut c: shard_router::control::ControlPlane) -> Result<(), Box<dyn std::error::Error>> {
    /// let found = c.pin_rollout_stragglers(7).await?;
    /// for t in &found.split { eprintln!("{} has rows on {} and {}", t.tenant, t.from, t.to); }
    /// # Ok(()) }
    /// ```
    pub async fn pin_rollout_stragglers(
        &mut self,
        version: u64,
    ) -> Result<Stragglers, PublishError> {
        let mut found = Stragglers::default();
        let newest = self.latest().await?;
        if newest.version != version || version < 2 {
            return Ok(found);
        }
        let Some(before) = self.get(version - 1).await? else {
            return Ok(found);
        };
        let (old, new) = (before.load()?, newest.load()?);
        let rehomed = super::tenants_rehomed(&old, &new).await?;
        // Which of them wrote where the new map sends them too.
        let mut on_new: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for r in &rehomed {
            on_new
                .entry(r.to.as_str())
                .or_default()
                .push(r.tenant.as_str());
        }
        let mut split = std::collections::BTreeSet::new();
        for (shard, tenants) in on_new {
            let Some(index) = new.shard_index(shard) else {
                continue;
            };
            split.extend(
                super::rehoming::with_rows_on(new.shard(index), new.tenant_column(), &tenants)
                    .await
                    .map_err(RehomeError::from)?,
            );
        }
        let (split, pinned): (Vec<Rehomed>, Vec<Rehomed>) =
            rehomed.into_iter().partition(|r| split.contains(&r.tenant));
        found.split = split;
        if !pinned.is_empty() {
            let toml = add_pins(&set_version(&newest.toml, version + 1)?, &pinned)?;
            let published = self
                .publish(
                    &toml,
                    &PublishOptions::with_note(&format!(
                        "pins for tenants that first wrote during the rollout of version {version}"
                    )),
                )
                .await?;
            found.published = Some(published.version);
        }
        found.pinned = pinned;
        Ok(found)
    }
}

/// What the shards say that no publish may override: a fence that requires a
/// version above the offered one, or a move in flight the map does not show.
fn refuse_against_shards(
    truth: &super::rehoming::ShardTruth,
    offered: u64,
) -> Result<(), PublishError> {
    if offered < truth.highest_fence {
        return Err(PublishError::FencesAhead {
            offered,
            needed: truth.highest_fence,
        });
    }
    if !truth.moving_unshown.is_empty() {
        return Err(PublishError::MovingOnShards {
            tenants: truth.moving_unshown.clone(),
        });
    }
    Ok(())
}

/// Tenants with data the new map would send elsewhere: refused, or with
/// `pin_existing` pinned where their data is (`toml` and `new` rewritten).
/// Returns the tenants pinned.
fn pin_or_refuse(
    toml: &mut String,
    new: &mut crate::ShardMap,
    rehomed: Vec<Rehomed>,
    pin_existing: bool,
) -> Result<Vec<Rehomed>, PublishError> {
    if rehomed.is_empty() {
        return Ok(rehomed);
    }
    if !pin_existing {
        return Err(PublishError::Rehoming { tenants: rehomed });
    }
    *toml = add_pins(toml, &rehomed)?;
    *new = MapLoader::new().load_str(toml)?;
    Ok(rehomed)
}

/// Each URL of `map` that carries a password, named by its key.
fn passwords_in_urls(map: &crate::ShardMap) -> Vec<String> {
    let mut found = Vec::new();
    for shard in map.shards() {
        let name = shard.name();
        if has_password(shard.url()) {
            found.push(format!("shards.{name}.url"));
        }
        if shard.admin_url().is_some_and(has_password) {
            found.push(format!("shards.{name}.admin_url"));
        }
        for (i, replica) in shard.replicas().iter().enumerate() {
            if has_password(replica.url()) {
                found.push(format!("shards.{name}.replicas[{i}].url"));
            }
        }
    }
    found
        .into_iter()
        .map(|key| {
            let warning = format!(
                "{key} carries a password, stored in the control database where every router reads it; \
                 use password_env (the name of an environment variable) instead"
            );
            tracing::warn!("{warning}");
            warning
        })
        .collect()
}

/// Whether a connection string (URL or key=value) carries a password.
fn has_password(url: &str) -> bool {
    crate::pg::Endpoint::parse(url).is_ok_and(|e| e.config.get_password().is_some())
}

/// Refuses a map whose `[moves]` differ from the newest's, except the one
/// entry of the mover publishing it.
pub(crate) fn check_moves(
    newest: &str,
    offered: &str,
    mover: Option<&MoverPublish>,
) -> Result<(), PublishError> {
    let newest = MapDocument::parse(newest).map_err(PublishError::Rewrite)?;
    let offered = MapDocument::parse(offered).map_err(PublishError::Rewrite)?;
    let mut differing = offered.moves_differing(&newest);
    if let Some(mover) = mover {
        differing.retain(|t| *t != mover.tenant);
    }
    if differing.is_empty() {
        Ok(())
    } else {
        Err(PublishError::MovesChanged { tenants: differing })
    }
}

/// Adds `tenant = "shard"` pins (comments are not kept).
fn add_pins(toml: &str, pins: &[Rehomed]) -> Result<String, PublishError> {
    let mut doc = MapDocument::parse(toml).map_err(PublishError::Rewrite)?;
    for pin in pins {
        doc.pin(&pin.tenant, &pin.from)
            .map_err(PublishError::Rewrite)?;
    }
    Ok(doc.render())
}

fn set_version(toml: &str, version: u64) -> Result<String, PublishError> {
    let mut doc = MapDocument::parse(toml).map_err(PublishError::Rewrite)?;
    doc.set_version(version);
    Ok(doc.render())
}
