//! The one hash the crate uses for names it must agree on everywhere: the
//! placement ring (`map::placement::hash_bytes`) and the advisory-lock keys
//! (`pg::lock_keys`). SipHash-1-3 with keys (0, 0).

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

/// SipHash-1-3 of `bytes`, keys (0, 0).
pub(crate) fn sip13(bytes: &[u8]) -> u64 {
    let mut hasher = SipHasher13::new();
    hasher.write(bytes);
    hasher.finish()
}
