//! The pin index: tenant → shard for up to millions of pins, read-only after build.
//!
//! A general-purpose hash map costs two cache misses per lookup on a big table
//! (the bucket, then the key's own heap allocation). This open-addressing table
//! keeps keys of up to [`INLINE`] bytes inside 32-byte, cache-line-aligned slots,
//! so a lookup of such a tenant touches one cache line of the table; longer keys
//! are kept in an arena and cost one more. Lookups are exact: the whole key is
//! compared, never only a hash. The probe hash is [`probe_hash`], a folded
//! multiply over 8-byte words: about a nanosecond for a short id, against ten
//! for the ring's SipHash, which a pinned lookup never needs.

use super::ShardIndex;

/// Longest key stored inside its slot.
const INLINE: usize = 28;
/// Slot tag of an empty slot.
const EMPTY: u8 = 0;
/// Slot tag of a key longer than [`INLINE`], stored in the arena.
const LONG: u8 = 0xff;

/// The slot hash of a key: 8-byte little-endian words, each mixed in with a
/// folded 64×64→128-bit multiply (the mixing of foldhash and wyhash), then the
/// length. Not a placement contract: only this process's table uses it.
#[inline]
pub(crate) fn probe_hash(key: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    #[inline]
    fn fold(a: u64, b: u64) -> u64 {
        let m = (a as u128) * (b as u128);
        (m as u64) ^ ((m >> 64) as u64)
    }
    let mut h = 0x243F_6A88_85A3_08D3u64;
    let mut chunks = key.chunks_exact(8);
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        h = fold(h ^ word, K);
    }
    let rest = chunks.remainder();
    let mut last = [0u8; 8];
    last[..rest.len()].copy_from_slice(rest);
    h = fold(h ^ u64::from_le_bytes(last), K);
    fold(h ^ key.len() as u64, K ^ 0x5851_F42D_4C95_7F2D)
}

/// One slot: 32 bytes, aligned so it never straddles a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Slot {
    /// [`EMPTY`], the key's length (1..=28), or [`LONG`].
    tag: u8,
    shard: u16,
    /// The key itself; for [`LONG`] keys: 8 bytes of hash, 4 of arena offset, 1 of length.
    data: [u8; INLINE],
}

const EMPTY_SLOT: Slot = Slot {
    tag: EMPTY,
    shard: 0,
    data: [0; INLINE],
};

/// Tenant → shard, for pins.
#[derive(Clone, Default)]
pub(crate) struct PinIndex {
    slots: Box<[Slot]>,
    arena: Vec<u8>,
    len: usize,
}

impl PinIndex {
    /// Builds the index; `pins` must not repeat a tenant (map keys never do).
    pub(crate) fn build<'a>(pins: impl ExactSizeIterator<Item = (&'a str, ShardIndex)>) -> Self {
        let wanted = pins.len();
        if wanted == 0 {
            return PinIndex::default();
        }
        // Load factor at most 3/4 keeps probe sequences short.
        let capacity = (wanted * 4 / 3 + 1).next_power_of_two();
        let mut index = PinIndex {
            slots: vec![EMPTY_SLOT; capacity].into_boxed_slice(),
            arena: Vec::new(),
            len: 0,
        };
        for (tenant, shard) in pins {
            index.insert(tenant, probe_hash(tenant.as_bytes()), shard);
        }
        index
    }

    fn insert(&mut self, key: &str, hash: u64, shard: ShardIndex) {
        let mask = self.slots.len() - 1;
        let mut at = hash as usize & mask;
        while self.slots[at].tag != EMPTY {
            at = (at + 1) & mask;
        }
        let mut slot = Slot {
            tag: 0,
            shard: shard.0,
            data: [0; INLINE],
        };
        let bytes = key.as_bytes();
        if bytes.len() <= INLINE {
            slot.tag = bytes.len() as u8;
            slot.data[..bytes.len()].copy_from_slice(bytes);
        } else {
            slot.tag = LONG;
            slot.data[..8].copy_from_slice(&hash.to_le_bytes());
            slot.data[8..12].copy_from_slice(&(self.arena.len() as u32).to_le_bytes());
            slot.data[12] = bytes.len() as u8;
            self.arena.extend_from_slice(bytes);
        }
        self.slots[at] = slot;
        self.len += 1;
    }

    /// The shard pinned for `key`, whose [`probe_hash`] is `hash`.
    #[inline]
    pub(crate) fn get(&self, key: &str, hash: u64) -> Option<ShardIndex> {
        if self.len == 0 {
            return None;
        }
        let bytes = key.as_bytes();
        let mask = self.slots.len() - 1;
        let mut at = hash as usize & mask;
        loop {
            let slot = &self.slots[at];
            match slot.tag {
                EMPTY => return None,
                LONG if bytes.len() > INLINE && self.long_key(slot) == Some(bytes) => {
                    return Some(ShardIndex(slot.shard));
                }
                len if len as usize == bytes.len() && slot.data[..bytes.len()] == *bytes => {
                    return Some(ShardIndex(slot.shard));
                }
                _ => at = (at + 1) & mask,
            }
        }
    }

    fn long_key(&self, slot: &Slot) -> Option<&[u8]> {
        let offset = u32::from_le_bytes(slot.data[8..12].try_into().ok()?) as usize;
        self.arena.get(offset..offset + slot.data[12] as usize)
    }

    /// Every (tenant, shard), in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, ShardIndex)> {
        self.slots.iter().filter(|s| s.tag != EMPTY).map(|slot| {
            let bytes = if slot.tag == LONG {
                self.long_key(slot).unwrap_or_default()
            } else {
                &slot.data[..slot.tag as usize]
            };
            // Keys went in as `&str`, whole, so they come out as valid UTF-8.
            (
                std::str::from_utf8(bytes).unwrap_or_default(),
                ShardIndex(slot.shard),
            )
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes held by the index, for the memory figure in the benches.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<Slot>() + self.arena.capacity()
    }
}

impl PartialEq for PinIndex {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && self.iter().all(|(tenant, shard)| {
                other.get(tenant, probe_hash(tenant.as_bytes())) == Some(shard)
            })
    }
}
impl Eq for PinIndex {}

impl std::fmt::Debug for PinIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinIndex").field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn slots_are_one_half_cache_line() {
        assert_eq!(std::mem::size_of::<Slot>(), 32);
        assert_eq!(std::mem::align_of::<Slot>(), 32);
    }

    proptest! {
        #[test]
        fn agrees_with_a_hash_map(
            pins in proptest::collection::hash_map("[a-z0-9._-]{1,64}", 0u16..64, 0..300),
            probes in proptest::collection::vec("[a-z0-9._-]{1,64}", 0..50),
        ) {
            let expected: HashMap<String, ShardIndex> =
                pins.iter().map(|(t, s)| (t.clone(), ShardIndex(*s))).collect();
            let index = PinIndex::build(expected.iter().map(|(t, s)| (t.as_str(), *s)));
            prop_assert_eq!(index.len(), expected.len());
            for (tenant, shard) in &expected {
                prop_assert_eq!(index.get(tenant, probe_hash(tenant.as_bytes())), Some(*shard));
            }
            for probe in &probes {
                prop_assert_eq!(
                    index.get(probe, probe_hash(probe.as_bytes())),
                    expected.get(probe).copied()
                );
            }
            let listed: HashMap<String, ShardIndex> = index.iter().map(|(t, s)| (t.to_owned(), s)).collect();
            prop_assert_eq!(listed, expected);
        }
    }
}
