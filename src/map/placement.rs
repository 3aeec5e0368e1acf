//! Where a tenant lives when it is neither pinned nor moving: a consistent-hash ring.
//!
//! Placement is defined by bytes alone, so any tool in any language can
//! recompute it:
//!
//! * the hash is SipHash-1-3 with both keys 0, over raw bytes, as a `u64`;
//! * a tenant's point is the hash of its id's UTF-8 bytes;
//! * shard `s` with weight `w` owns `vnodes × w` points, point `i` being the hash
//!   of the bytes `"{s}#{i}"` (`i` in decimal, from 0);
//! * points are sorted by (hash, shard name); a tenant belongs to the first point
//!   whose hash is at least its own, wrapping to the first point.
//!
//! The ring is built through the `consistent_hash` crate's [`RingHash`] trait,
//! and a test checks lookups against its `StaticHashRing`. Lookups here use a
//! flat sorted vector with a binary search, because the crate's candidate
//! iterator allocates a tree on every call (about 3× slower).

use std::hash::{Hash, Hasher};

use consistent_hash::RingHash;
use siphasher::sip::SipHasher13;

use super::ShardIndex;

/// The ring's hash of raw bytes: SipHash-1-3, keys (0, 0).
///
/// ```
/// use shard_router::map::placement::hash_bytes;
/// assert_eq!(hash_bytes(b"acme"), hash_bytes(b"acme"));
/// ```
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    crate::hash::sip13(bytes)
}

/// The hash of vnode `seq` of shard `shard`: [`hash_bytes`] of `"{shard}#{seq}"`.
///
/// ```
/// use shard_router::map::placement::{hash_bytes, vnode_hash};
/// assert_eq!(vnode_hash("a", 7), hash_bytes(b"a#7"));
/// ```
pub fn vnode_hash(shard: &str, seq: usize) -> u64 {
    BytesHash.hash_vnode(&RawBytes(shard.as_bytes()), seq)
}

/// Bytes whose `Hash` writes exactly the bytes, with no length or terminator, so
/// the ring never depends on how the standard library hashes `str`.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct RawBytes<'a>(&'a [u8]);

impl Hash for RawBytes<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0);
    }
}

/// The `RingHash` of shard-router: SipHash-1-3 over the bytes that `Hash` writes.
struct BytesHash;

impl RingHash for BytesHash {
    fn hash_item<T: Hash>(&self, item: &T) -> u64 {
        let mut hasher = SipHasher13::new();
        item.hash(&mut hasher);
        hasher.finish()
    }

    fn hash_vnode<K: Hash>(&self, node_key: &K, vnode_seq: usize) -> u64 {
        let mut hasher = SipHasher13::new();
        node_key.hash(&mut hasher);
        hasher.write(b"#");
        hasher.write(vnode_seq.to_string().as_bytes());
        hasher.finish()
    }
}

/// The ring's points, sorted, for lookups by binary search.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Ring {
    points: Vec<(u64, ShardIndex)>,
}

impl Ring {
    /// Builds the ring; `shards` are (name, points) in shard-index order.
    pub(crate) fn build<'a>(shards: impl Iterator<Item = (&'a str, usize)>) -> Ring {
        let mut points: Vec<(u64, ShardIndex, &str)> = Vec::new();
        for (index, (name, count)) in shards.enumerate() {
            let index = ShardIndex(index as u16);
            points.extend((0..count).map(|seq| (vnode_hash(name, seq), index, name)));
        }
        // The same order as `consistent_hash::StaticHashRing`: by hash, then by shard name.
        points.sort_unstable_by(|a, b| (a.0, a.2).cmp(&(b.0, b.2)));
        Ring {
            points: points.into_iter().map(|(h, i, _)| (h, i)).collect(),
        }
    }

    /// The shard owning `tenant`, or `None` on an empty ring.
    pub(crate) fn locate(&self, tenant: &str) -> Option<ShardIndex> {
        self.locate_hash(hash_bytes(tenant.as_bytes()))
    }

    /// The shard owning the tenant whose [`hash_bytes`] is `hash`.
    #[inline]
    pub(crate) fn locate_hash(&self, hash: u64) -> Option<ShardIndex> {
        let at = self.points.partition_point(|(point, _)| *point < hash);
        self.points
            .get(at)
            .or_else(|| self.points.first())
            .map(|(_, shard)| *shard)
    }

    /// The points' hashes, in ring order.
    pub(crate) fn hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.points.iter().map(|(hash, _)| *hash)
    }

    /// Number of points on the ring.
    pub(crate) fn len(&self) -> usize {
        self.points.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use consistent_hash::{Node, StaticHashRing};
    use proptest::prelude::*;

    /// Placement is a contract: these vectors must never change. If this test
    /// fails after a dependency upgrade, tenants would be silently re-homed.
    #[test]
    fn golden_hashes() {
        assert_eq!(hash_bytes(b""), 0xd1fba762150c532c);
        assert_eq!(hash_bytes(b"acme"), GOLDEN_ACME);
        assert_eq!(vnode_hash("a", 0), hash_bytes(b"a#0"));
        assert_eq!(vnode_hash("shard_b", 127), hash_bytes(b"shard_b#127"));
    }
    // Checked against the independent implementation in tests/golden/placement.py.
    const GOLDEN_ACME: u64 = 0x3dd3f1b03a8aef94;

    #[test]
    fn golden_placement() {
        let ring = Ring::build([("a", 128), ("b", 128), ("c", 256)].into_iter());
        let names = ["a", "b", "c"];
        let got: Vec<&str> = GOLDEN_TENANTS
            .iter()
            .map(|t| names[ring.locate(t).unwrap().0 as usize])
            .collect();
        assert_eq!(got, GOLDEN_SHARDS);
    }
    const GOLDEN_TENANTS: [&str; 8] = [
        "acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "t-000001",
    ];
    const GOLDEN_SHARDS: [&str; 8] = ["c", "b", "c", "b", "c", "c", "c", "a"];

    proptest! {
        #[test]
        fn lookups_match_the_consistent_hash_crate(
            weights in proptest::collection::vec(0usize..4, 1..6),
            tenants in proptest::collection::vec("[a-z0-9]{1,12}", 1..40),
        ) {
            prop_assume!(weights.iter().any(|w| *w > 0));
            let names: Vec<String> = (0..weights.len()).map(|i| format!("s{i}")).collect();
            let ring = Ring::build(names.iter().map(String::as_str).zip(weights.iter().map(|w| w * 8)));
            let reference = StaticHashRing::new(
                BytesHash,
                names.iter().zip(&weights).filter(|(_, w)| **w > 0).map(|(n, w)| {
                    Node::new(RawBytes(n.as_bytes())).quantity(w * 8)
                }),
            );
            for tenant in &tenants {
                let ours = &names[ring.locate(tenant).unwrap().0 as usize];
                let theirs = reference.calc_candidates(&RawBytes(tenant.as_bytes())).next().unwrap();
                prop_assert_eq!(ours.as_bytes(), theirs.key.0);
            }
        }

        #[test]
        fn changing_one_weight_moves_tenants_only_to_or_from_that_shard(
            weights in proptest::collection::vec(1usize..4, 2..6),
            changed in 0usize..6,
            new_weight in 0usize..5,
            tenants in proptest::collection::vec("[a-z0-9]{1,12}", 1..60),
        ) {
            let changed = changed % weights.len();
            let mut after = weights.clone();
            after[changed] = new_weight;
            prop_assume!(after.iter().any(|w| *w > 0));
            let names: Vec<String> = (0..weights.len()).map(|i| format!("s{i}")).collect();
            let build = |ws: &[usize]| Ring::build(names.iter().map(String::as_str).zip(ws.iter().map(|w| w * 16)));
            let (before_ring, after_ring) = (build(&weights), build(&after));
            for tenant in &tenants {
                let (b, a) = (before_ring.locate(tenant).unwrap(), after_ring.locate(tenant).unwrap());
                if a != b {
                    prop_assert!(a.0 as usize == changed || b.0 as usize == changed,
                        "{tenant} moved {b:?} -> {a:?} though only shard {changed} changed");
                }
            }
        }

        #[test]
        fn placement_is_deterministic(tenant in "[a-zA-Z0-9_.-]{1,64}") {
            let build = || Ring::build([("a", 64), ("b", 64)].into_iter());
            prop_assert_eq!(build().locate(&tenant), build().locate(&tenant));
        }
    }
}
