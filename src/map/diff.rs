//! What changes between two shard maps.

use std::fmt;

use super::{MovePhase, ShardMap};

/// The difference between two maps: shards, pins and moves that changed, and
/// how much of the ring's hash space changes owner.
///
/// ```
/// use shard_router::map::{MapDiff, MapLoader};
///
/// let load = |v: u64, extra: &str| MapLoader::without_env().load_str(&format!(
///     "version = {v}\n[shards.a]\nurl = \"postgres://h/a\"\n{extra}")).unwrap();
/// let diff = MapDiff::between(
///     &load(1, ""),
///     &load(2, "[shards.b]\nurl = \"postgres://h/b\"\n[tenants]\nacme = \"b\""),
/// );
/// assert_eq!(diff.shards_added, ["b"]);
/// assert_eq!((diff.pins_added[0].tenant.as_str(), diff.pins_added[0].shard.as_str()), ("acme", "b"));
/// assert!(diff.ring_moved > 0.3 && diff.ring_moved < 0.7); // about half the ring moves to b
/// // `shardctl --json map diff` prints this serialization.
/// assert_eq!(serde_json::to_value(&diff).unwrap()["pins_added"][0]["tenant"], "acme");
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct MapDiff {
    /// The older map's version.
    pub from_version: u64,
    /// The newer map's version.
    pub to_version: u64,
    /// Shards only in the newer map.
    pub shards_added: Vec<String>,
    /// Shards only in the older map.
    pub shards_removed: Vec<String>,
    /// Shards in both whose settings differ, with what differs.
    pub shards_changed: Vec<ShardChange>,
    /// Pins only in the newer map.
    pub pins_added: Vec<Pin>,
    /// Pins only in the older map.
    pub pins_removed: Vec<Pin>,
    /// Pins to another shard.
    pub pins_changed: Vec<TenantShardChange>,
    /// Moves that started, changed phase or ended.
    pub moves_changed: Vec<MoveChange>,
    /// Share of the ring's hash space (0 to 1) whose shard changes: roughly the
    /// share of unpinned tenants that would change shard.
    pub ring_moved: f64,
    /// Tenants named by pins or moves in either map whose shard changes.
    #[serde(rename = "tenants_changing_shard")]
    pub named_tenants_moved: Vec<TenantShardChange>,
}

/// A shard in both maps whose settings differ.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ShardChange {
    /// The shard.
    pub shard: String,
    /// What differs: `url`, `admin_url`, `weight`, `pool`, `replicas`,
    /// `max_replica_lag_ms`.
    pub changed: Vec<&'static str>,
}

/// A tenant pinned to a shard.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Pin {
    /// The tenant.
    pub tenant: String,
    /// Its shard.
    pub shard: String,
}

/// A tenant whose shard differs between the maps.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct TenantShardChange {
    /// The tenant.
    pub tenant: String,
    /// Its shard in the older map.
    pub from: String,
    /// Its shard in the newer map.
    pub to: String,
}

/// A move that started, changed phase or ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct MoveChange {
    /// The tenant.
    pub tenant: String,
    /// `a -> b (dual_write)`, or `not moving`.
    pub before: String,
    /// The same, in the newer map.
    pub after: String,
}

/// The three-string record of a tenant and two shards.
fn switch(tenant: &str, from: String, to: String) -> TenantShardChange {
    TenantShardChange {
        tenant: tenant.to_owned(),
        from,
        to,
    }
}

impl MapDiff {
    /// Compares `old` with `new`.
    ///
    /// ```
    /// # use shard_router::map::{MapDiff, MapLoader};
    /// # let m = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/a\"").unwrap();
    /// assert!(MapDiff::between(&m, &m).is_empty());
    /// ```
    pub fn between(old: &ShardMap, new: &ShardMap) -> MapDiff {
        let mut diff = MapDiff {
            from_version: old.version(),
            to_version: new.version(),
            shards_added: Vec::new(),
            shards_removed: Vec::new(),
            shards_changed: Vec::new(),
            pins_added: Vec::new(),
            pins_removed: Vec::new(),
            pins_changed: Vec::new(),
            moves_changed: Vec::new(),
            ring_moved: ring_moved(old, new),
            named_tenants_moved: Vec::new(),
        };
        for shard in new.shards() {
            match old.shard_index(shard.name()).map(|i| old.shard(i)) {
                None => diff.shards_added.push(shard.name().to_owned()),
                Some(before) => {
                    let mut what = Vec::new();
                    if before.url() != shard.url() {
                        what.push("url");
                    }
                    if before.admin_url() != shard.admin_url() {
                        what.push("admin_url");
                    }
                    if before.weight() != shard.weight() {
                        what.push("weight");
                    }
                    if before.pool() != shard.pool() {
                        what.push("pool");
                    }
                    let replicas = |s: &super::Shard| {
                        s.replicas()
                            .iter()
                            .map(|r| (r.url().to_owned(), r.weight(), *r.pool()))
                            .collect::<Vec<_>>()
                    };
                    if replicas(before) != replicas(shard) {
                        what.push("replicas");
                    }
                    if before.max_replica_lag() != shard.max_replica_lag() {
                        what.push("max_replica_lag_ms");
                    }
                    if !what.is_empty() {
                        diff.shards_changed.push(ShardChange {
                            shard: shard.name().to_owned(),
                            changed: what,
                        });
                    }
                }
            }
        }
        for shard in old.shards() {
            if new.shard_index(shard.name()).is_none() {
                diff.shards_removed.push(shard.name().to_owned());
            }
        }

        let old_pins = old.pins();
        let new_pins = new.pins();
        let name = |map: &ShardMap, i| map.shard(i).name().to_owned();
        for (tenant, shard) in &new_pins {
            match old_pins.binary_search_by(|(t, _)| t.cmp(tenant)) {
                Err(_) => diff.pins_added.push(Pin {
                    tenant: tenant.to_string(),
                    shard: name(new, *shard),
                }),
                Ok(at) => {
                    let (before, after) = (name(old, old_pins[at].1), name(new, *shard));
                    if before != after {
                        diff.pins_changed.push(switch(tenant, before, after));
                    }
                }
            }
        }
        for (tenant, shard) in &old_pins {
            if new_pins.binary_search_by(|(t, _)| t.cmp(tenant)).is_err() {
                diff.pins_removed.push(Pin {
                    tenant: tenant.to_string(),
                    shard: name(old, *shard),
                });
            }
        }

        let describe = |map: &ShardMap, tenant: &str| {
            let id = crate::TenantId::new(tenant).ok()?;
            map.move_of(&id).map(|m| {
                let phase = match m.phase {
                    MovePhase::DualWrite => "dual_write",
                    MovePhase::Reversed => "reversed",
                };
                format!("{} -> {} ({phase})", name(map, m.from), name(map, m.to))
            })
        };
        let mut moving: Vec<&str> = old.moves().iter().map(|(t, _)| *t).collect();
        moving.extend(new.moves().iter().map(|(t, _)| *t));
        moving.sort_unstable();
        moving.dedup();
        for tenant in &moving {
            let (before, after) = (describe(old, tenant), describe(new, tenant));
            if before != after {
                diff.moves_changed.push(MoveChange {
                    tenant: tenant.to_string(),
                    before: before.unwrap_or_else(|| "not moving".into()),
                    after: after.unwrap_or_else(|| "not moving".into()),
                });
            }
        }

        let mut named: Vec<&str> = old_pins.iter().chain(&new_pins).map(|(t, _)| *t).collect();
        named.extend(moving);
        named.sort_unstable();
        named.dedup();
        for tenant in named {
            let Ok(id) = crate::TenantId::new(tenant) else {
                continue;
            };
            let (before, after) = (
                name(old, old.locate(&id).shard),
                name(new, new.locate(&id).shard),
            );
            if before != after {
                diff.named_tenants_moved.push(switch(tenant, before, after));
            }
        }
        diff
    }

    /// True when the maps route every tenant alike over the same shard settings.
    ///
    /// ```
    /// # use shard_router::map::{MapDiff, MapLoader};
    /// # let m = MapLoader::without_env().load_str("version = 1\n[shards.a]\nurl = \"postgres://h/a\"").unwrap();
    /// assert!(MapDiff::between(&m, &m).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.shards_added.is_empty()
            && self.shards_removed.is_empty()
            && self.shards_changed.is_empty()
            && self.pins_added.is_empty()
            && self.pins_removed.is_empty()
            && self.pins_changed.is_empty()
            && self.moves_changed.is_empty()
            && self.ring_moved == 0.0
    }
}

/// The share of the 64-bit hash space whose owner (by shard name) differs.
fn ring_moved(old: &ShardMap, new: &ShardMap) -> f64 {
    let mut points: Vec<u64> = old.ring.hashes().chain(new.ring.hashes()).collect();
    points.sort_unstable();
    points.dedup();
    let Some((&first, &last)) = points.first().zip(points.last()) else {
        return 0.0;
    };
    let owner = |map: &ShardMap, hash: u64| {
        map.ring
            .locate_hash(hash)
            .map(|i| map.shard(i).name().to_owned())
    };
    let differs = |hash: u64| owner(old, hash) != owner(new, hash);
    // Each arc (previous point, point] belongs to the owner of its end point;
    // the arc that wraps past the top belongs to the owner of the first point.
    let mut moved: u128 = 0;
    for pair in points.windows(2) {
        if differs(pair[1]) {
            moved += (pair[1] - pair[0]) as u128;
        }
    }
    if differs(first) {
        moved += (1u128 << 64) - last as u128 + first as u128;
    }
    moved as f64 / (1u128 << 64) as f64
}

impl fmt::Display for MapDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "version {} -> {}", self.from_version, self.to_version)?;
        if self.is_empty() {
            return writeln!(f, "  no routing or shard changes");
        }
        for s in &self.shards_added {
            writeln!(f, "  + shard {s}")?;
        }
        for s in &self.shards_removed {
            writeln!(f, "  - shard {s}")?;
        }
        for c in &self.shards_changed {
            writeln!(f, "  ~ shard {}: {}", c.shard, c.changed.join(", "))?;
        }
        for p in &self.pins_added {
            writeln!(f, "  + pin {} = {}", p.tenant, p.shard)?;
        }
        for p in &self.pins_removed {
            writeln!(f, "  - pin {} = {}", p.tenant, p.shard)?;
        }
        for c in &self.pins_changed {
            writeln!(f, "  ~ pin {}: {} -> {}", c.tenant, c.from, c.to)?;
        }
        for c in &self.moves_changed {
            writeln!(f, "  ~ move {}: {} => {}", c.tenant, c.before, c.after)?;
        }
        if self.ring_moved > 0.0 {
            writeln!(
                f,
                "  ring: {:.2}% of the hash space changes shard",
                self.ring_moved * 100.0
            )?;
        }
        for c in &self.named_tenants_moved {
            writeln!(
                f,
                "  tenant {} changes shard: {} -> {}",
                c.tenant, c.from, c.to
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::MapLoader;

    fn load(toml: &str) -> ShardMap {
        MapLoader::without_env().load_str(toml).unwrap()
    }

    #[test]
    fn ring_share_matches_the_weights() {
        let two = load("version = 1\n[shards.a]\nurl = \"postgres://h/a\"\n[shards.b]\nurl = \"postgres://h/b\"\n");
        let same = load("version = 2\n[shards.a]\nurl = \"postgres://h/a\"\n[shards.b]\nurl = \"postgres://h/b\"\n");
        assert_eq!(MapDiff::between(&two, &same).ring_moved, 0.0);
        // Adding a third equal shard moves about a third of the space, all of it to c.
        let three = load("version = 3\n[shards.a]\nurl = \"postgres://h/a\"\n[shards.b]\nurl = \"postgres://h/b\"\n[shards.c]\nurl = \"postgres://h/c\"\n");
        let moved = MapDiff::between(&two, &three).ring_moved;
        assert!((0.25..0.42).contains(&moved), "{moved}");
        // Checked against sampling: the share of sampled tenants that change shard.
        let sampled = (0..20_000)
            .filter(|i| {
                let t = crate::TenantId::new(&format!("t{i}")).unwrap();
                two.shard(two.locate(&t).shard).name() != three.shard(three.locate(&t).shard).name()
            })
            .count() as f64
            / 20_000.0;
        assert!((moved - sampled).abs() < 0.02, "{moved} vs {sampled}");
    }

    #[test]
    fn pins_and_moves_are_listed_with_tenants_that_change_shard() {
        let old = load("version = 1\n[shards.a]\nurl = \"postgres://h/a\"\n[shards.b]\nurl = \"postgres://h/b\"\n[tenants]\nacme = \"a\"\ninitech = \"a\"\n");
        let new = load("version = 2\n[shards.a]\nurl = \"postgres://h/a\"\n[shards.b]\nurl = \"postgres://h/b2\"\n[tenants]\nacme = \"b\"\n[moves.globex]\nfrom = \"a\"\nto = \"b\"\n");
        let diff = MapDiff::between(&old, &new);
        let changed = ShardChange {
            shard: "b".into(),
            changed: vec!["url"],
        };
        assert_eq!(diff.shards_changed, [changed]);
        assert_eq!(diff.pins_changed, [switch("acme", "a".into(), "b".into())]);
        let initech = Pin {
            tenant: "initech".into(),
            shard: "a".into(),
        };
        assert_eq!(diff.pins_removed, [initech]);
        assert_eq!(diff.moves_changed[0].tenant, "globex");
        assert!(diff
            .named_tenants_moved
            .contains(&switch("acme", "a".into(), "b".into())));
        let json = serde_json::to_value(&diff).unwrap();
        assert_eq!(json["pins_changed"][0]["to"], "b");
        assert_eq!(json["tenants_changing_shard"][0]["tenant"], "acme");
        let text = diff.to_string();
        assert!(text.contains("~ pin acme: a -> b"), "{text}");
    }

    #[test]
    fn replicas_added_or_changed_are_a_shard_change() {
        let base = "[shards.a]\nurl = \"postgres://h/a\"\n";
        let old = load(&format!("version = 1\n{base}"));
        let new = load(&format!(
            "version = 2\n{base}replicas = [{{ url = \"postgres://r1/a\" }}]\nmax_replica_lag_ms = 500\n"
        ));
        let diff = MapDiff::between(&old, &new);
        assert!(!diff.is_empty());
        assert_eq!(
            diff.shards_changed[0].changed,
            ["replicas", "max_replica_lag_ms"]
        );
        let text = diff.to_string();
        assert!(!text.contains("no routing or shard changes"), "{text}");
    }
}
