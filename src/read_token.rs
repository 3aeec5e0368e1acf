//! The read-your-writes token, sealed: it carries the primary's WAL position
//! after a write, encrypted and authenticated with a key every router of the
//! shard derives alike and clients do not have. A client cannot read the
//! position (from which it could tell how much other tenants write), and a
//! token it made up or altered is refused (its reads go to the primary)
//! instead of making a replica wait for a position nobody wrote.
//!
//! The position is enciphered with a four-round Feistel network over its two
//! 32-bit halves, the round function SipHash-1-3 keyed per shard and tweaked
//! with the shard and tenant, so the same position gives different tokens for
//! two tenants; a 32-bit tag over the position, shard and tenant authenticates
//! it. The key comes from `SHARD_ROUTER_TOKEN_SECRET` (give every router the
//! same random value) and the shard's name; without the secret, from the
//! shard's name and URL, with a warning.

use std::fmt;
use std::hash::Hasher;
use std::str::FromStr;

use siphasher::sip::SipHasher13;

use crate::map::Shard;
use crate::replicas::Lsn;

/// The environment variable whose value, when set, is mixed into every
/// shard's token key.
pub const TOKEN_SECRET_ENV: &str = "SHARD_ROUTER_TOKEN_SECRET";

/// The name of the header (and gRPC metadata key) that carries a [`ReadToken`].
pub const TOKEN_HEADER: &str = "x-shard-router-token";

/// Proof that a write committed, for reading it back from a replica: the
/// primary's WAL position after the commit, sealed, scoped to one tenant on
/// one shard. The layer returns it in the `x-shard-router-token` response
/// header (gRPC: metadata) and honours it on later requests; a job can carry
/// it too ([`crate::TenantDb::with_token`]).
///
/// Its text form is `v2.<shard>.<24 hex digits>.<tenant>`; the digits are the
/// sealed position, which only a router of that shard can open. A token of the
/// right form that does not open (altered, made up, or sealed under another
/// URL or secret) sends the request's reads to the primary.
///
/// ```
/// let token: shard_router::ReadToken = "v2.a.0123456789ABCDEF01234567.acme".parse().unwrap();
/// assert_eq!((token.shard(), token.tenant()), ("a", "acme"));
/// assert_eq!(token.to_string(), "v2.a.0123456789ABCDEF01234567.acme");
/// // The first version showed the position itself: no longer accepted.
/// assert!("v1.a.16B374D848.acme".parse::<shard_router::ReadToken>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadToken {
    shard: String,
    tenant: String,
    sealed: u64,
    tag: u32,
}

impl ReadToken {
    /// A token for a write of `tenant` that committed on `shard` at `lsn`.
    pub(crate) fn seal(key: &TokenKey, shard: &str, tenant: &str, lsn: Lsn) -> ReadToken {
        let (mut left, mut right) = ((lsn >> 32) as u32, lsn as u32);
        for round in 0..ROUNDS {
            let mixed = left ^ key.prf(round, shard, tenant, right as u64) as u32;
            left = right;
            right = mixed;
        }
        ReadToken {
            shard: shard.to_owned(),
            tenant: tenant.to_owned(),
            sealed: (left as u64) << 32 | right as u64,
            tag: key.prf(TAG, shard, tenant, lsn) as u32,
        }
    }

    /// The position sealed in this token, or `None` when `key` does not open
    /// it (the token was altered or made up, or another key sealed it).
    pub(crate) fn open(&self, key: &TokenKey) -> Option<Lsn> {
        let (shard, tenant) = (self.shard.as_str(), self.tenant.as_str());
        let (mut left, mut right) = ((self.sealed >> 32) as u32, self.sealed as u32);
        for round in (0..ROUNDS).rev() {
            let before = right ^ key.prf(round, shard, tenant, left as u64) as u32;
            right = left;
            left = before;
        }
        let lsn = (left as u64) << 32 | right as u64;
        (key.prf(TAG, shard, tenant, lsn) as u32 == self.tag).then_some(lsn)
    }

    /// The shard the write committed on.
    ///
    /// ```
    /// let token: shard_router::ReadToken = "v2.b.0123456789ABCDEF01234567.acme".parse().unwrap();
    /// assert_eq!(token.shard(), "b");
    /// ```
    pub fn shard(&self) -> &str {
        &self.shard
    }

    /// The tenant that wrote.
    ///
    /// ```
    /// let token: shard_router::ReadToken = "v2.b.0123456789ABCDEF01234567.acme.eu".parse().unwrap();
    /// assert_eq!(token.tenant(), "acme.eu");
    /// ```
    pub fn tenant(&self) -> &str {
        &self.tenant
    }
}

impl fmt::Display for ReadToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "v2.{}.{:016X}{:08X}.{}",
            self.shard, self.sealed, self.tag, self.tenant
        )
    }
}

/// A token that could not be read; requests carrying one read from primaries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a shard-router token (expected v2.<shard>.<24 hex digits>.<tenant>)")]
pub struct BadToken;

impl FromStr for ReadToken {
    type Err = BadToken;
    fn from_str(s: &str) -> Result<Self, BadToken> {
        let mut parts = s.splitn(4, '.');
        let (Some("v2"), Some(shard), Some(sealed), Some(tenant)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(BadToken);
        };
        if shard.is_empty()
            || tenant.is_empty()
            || sealed.len() != 24
            || !sealed.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(BadToken);
        }
        let hex = |digits: &str| u64::from_str_radix(digits, 16).map_err(|_| BadToken);
        Ok(ReadToken {
            shard: shard.to_owned(),
            tenant: tenant.to_owned(),
            sealed: hex(&sealed[..16])?,
            tag: hex(&sealed[16..])? as u32,
        })
    }
}

/// Feistel rounds; four make a strong pseudorandom permutation.
const ROUNDS: u8 = 4;
/// The round-function label of the tag.
const TAG: u8 = ROUNDS;

/// The key that seals one shard's tokens.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct TokenKey {
    k0: u64,
    k1: u64,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// The key of `shard`'s tokens: from the secret in [`TOKEN_SECRET_ENV`]
    /// and the shard's name, or, without a secret, from its name and URL
    /// (with a warning: someone who knows the URL can open and forge tokens).
    pub(crate) fn for_shard(shard: &Shard) -> TokenKey {
        match std::env::var(TOKEN_SECRET_ENV) {
            Ok(secret) if !secret.is_empty() => TokenKey::derive(&secret, shard.name(), ""),
            _ => {
                tracing::warn!(
                    shard = shard.name(),
                    "{TOKEN_SECRET_ENV} is not set: read tokens are sealed with a key derived from \
                     the shard's URL, which whoever knows it can derive too; set it to the same \
                     random value on every router"
                );
                TokenKey::derive("", shard.name(), shard.url())
            }
        }
    }

    fn derive(secret: &str, shard: &str, url: &str) -> TokenKey {
        let part = |label: u8| {
            // Fixed keys: the secret part is the input, not these.
            let mut hasher =
                SipHasher13::new_with_keys(0x7368_6172_642d_726f, 0x7574_6572_746f_6b6e);
            hasher.write_u8(label);
            for field in [secret, shard, url] {
                hasher.write_usize(field.len());
                hasher.write(field.as_bytes());
            }
            hasher.finish()
        };
        TokenKey {
            k0: part(0),
            k1: part(1),
        }
    }

    /// The round function (and, with label [`TAG`], the tag).
    fn prf(&self, label: u8, shard: &str, tenant: &str, x: u64) -> u64 {
        let mut hasher = SipHasher13::new_with_keys(self.k0, self.k1);
        hasher.write_u8(label);
        hasher.write_u64(x);
        hasher.write_usize(shard.len());
        hasher.write(shard.as_bytes());
        hasher.write(tenant.as_bytes());
        hasher.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(url: &str) -> TokenKey {
        TokenKey::derive("", "a", url)
    }

    #[test]
    fn a_sealed_position_opens_with_its_key_only() {
        let k = key("postgres://h/a");
        for lsn in [0, 1, 0xABC, 0x16_B374_D848, u64::MAX] {
            let token = ReadToken::seal(&k, "a", "acme.eu", lsn);
            let text = token.to_string();
            if lsn > u32::MAX as u64 {
                assert!(!text.contains(&format!("{lsn:X}")), "{text}");
            }
            let parsed: ReadToken = text.parse().unwrap();
            assert_eq!(parsed, token);
            assert_eq!(parsed.open(&k), Some(lsn));
            assert_eq!(parsed.open(&key("postgres://h2/a")), None);
            assert_eq!(
                parsed.open(&TokenKey::derive("secret", "a", "postgres://h/a")),
                None
            );
        }
    }

    #[test]
    fn an_altered_token_does_not_open() {
        let k = key("postgres://h/a");
        let token = ReadToken::seal(&k, "a", "acme", 0x16_B374_D848);
        let text = token.to_string();
        // Every single-digit change of the sealed part is caught by the tag.
        let digits = &text[5..29];
        for i in 0..24 {
            let mut changed = digits.as_bytes().to_vec();
            changed[i] = if changed[i] == b'0' { b'1' } else { b'0' };
            let altered = format!("v2.a.{}.acme", String::from_utf8(changed).unwrap());
            assert_eq!(
                altered.parse::<ReadToken>().unwrap().open(&k),
                None,
                "{altered}"
            );
        }
        // Another tenant's name on the same digits does not open either.
        let moved = text.replace(".acme", ".other");
        assert_eq!(moved.parse::<ReadToken>().unwrap().open(&k), None);
    }

    #[test]
    fn two_tenants_at_one_position_get_different_tokens() {
        let k = key("postgres://h/a");
        let (t1, t2) = (
            ReadToken::seal(&k, "a", "t1", 77),
            ReadToken::seal(&k, "a", "t2", 77),
        );
        assert_ne!(t1.to_string()[5..29], t2.to_string()[5..29]);
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            "",
            "v2",
            "v1.a.16B374D848.acme",
            "v2.a.0123456789ABCDEF0123456.acme",
            "v2.a.0123456789ABCDEF012345678.acme",
            "v2.a.0123456789ABCDEF0123456Z.acme",
            "v2.a.+123456789ABCDEF01234567.acme",
            "v2..0123456789ABCDEF01234567.acme",
            "v2.a.0123456789ABCDEF01234567.",
            "v2.a.0123456789ABCDEF01234567",
        ] {
            assert!(bad.parse::<ReadToken>().is_err(), "{bad}");
        }
    }
}
