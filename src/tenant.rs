//! Tenant ids and the extractors that find them in a request.
//!
//! A [`TenantId`] is validated once, when it is made, so everything downstream
//! (placement, logs, SQL parameters) can trust it. Extractors implement
//! [`TenantExtractor`]; the ready ones read a header ([`HeaderExtractor`]), the
//! host's subdomain ([`SubdomainExtractor`]) or a path segment
//! ([`PathSegmentExtractor`]), and any `Fn(&Parts) -> Result<TenantId, ExtractError>`
//! closure is an extractor too.
//!
//! # Example
//!
//! ```
//! use shard_router::tenant::{HeaderExtractor, TenantExtractor};
//!
//! let req = http::Request::builder().header("x-tenant-id", "acme").body(()).unwrap();
//! let (parts, _body) = req.into_parts();
//! let tenant = HeaderExtractor::default().extract(&parts).unwrap();
//! assert_eq!(tenant.as_str(), "acme");
//! ```

use std::fmt;
use std::sync::Arc;

use http::request::Parts;
use http::HeaderName;

/// The longest tenant id accepted, in bytes.
pub const MAX_TENANT_ID_LEN: usize = 64;

/// A validated tenant id.
///
/// Rules: 1 to [`MAX_TENANT_ID_LEN`] bytes of ASCII letters, digits, `_`, `-`
/// and `.`, starting with a letter or a digit. Ids are case-sensitive. These rules
/// keep ids safe in logs, metrics labels, host names and file names; ids are
/// still only ever passed to SQL as parameters, never spliced into it.
///
/// Cloning is cheap (a reference count).
///
/// # Example
///
/// ```
/// use shard_router::TenantId;
///
/// let id = TenantId::new("acme-eu.1").unwrap();
/// assert_eq!(id.as_str(), "acme-eu.1");
/// assert!(TenantId::new("").is_err());
/// assert!(TenantId::new("acme'; drop table notes; --").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Arc<str>);

impl TenantId {
    /// Validates `id` and makes a tenant id of it.
    ///
    /// ```
    /// # use shard_router::TenantId;
    /// assert!(TenantId::new("globex").is_ok());
    /// ```
    pub fn new(id: &str) -> Result<Self, TenantIdError> {
        validate(id)?;
        Ok(TenantId(Arc::from(id)))
    }

    /// Validates raw bytes (a header value, say) and makes a tenant id of them.
    ///
    /// ```
    /// # use shard_router::{TenantId, TenantIdError};
    /// assert_eq!(TenantId::from_bytes(b"acme").unwrap().as_str(), "acme");
    /// assert_eq!(TenantId::from_bytes(&[0xff]), Err(TenantIdError::NotUtf8));
    /// ```
    pub fn from_bytes(id: &[u8]) -> Result<Self, TenantIdError> {
        let text = std::str::from_utf8(id).map_err(|_| TenantIdError::NotUtf8)?;
        Self::new(text)
    }

    /// The id as text.
    ///
    /// ```
    /// # use shard_router::TenantId;
    /// assert_eq!(TenantId::new("acme").unwrap().as_str(), "acme");
    /// ```
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks `id` against the [`TenantId`] rules without making one.
pub(crate) fn validate(id: &str) -> Result<(), TenantIdError> {
    let id = id.as_bytes();
    if id.is_empty() {
        return Err(TenantIdError::Empty);
    }
    if id.len() > MAX_TENANT_ID_LEN {
        return Err(TenantIdError::TooLong { len: id.len() });
    }
    if !id[0].is_ascii_alphanumeric() {
        return Err(TenantIdError::BadStart);
    }
    if let Some(position) = id
        .iter()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')))
    {
        // `id` is a `str`, so a non-ASCII byte is part of a character (a
        // look-alike letter, say): a forbidden character. Raw bytes that are not
        // UTF-8 were refused by `from_bytes` already.
        return Err(TenantIdError::ForbiddenChar { position });
    }
    Ok(())
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({:?})", &*self.0)
    }
}

impl AsRef<str> for TenantId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for TenantId {
    type Err = TenantIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TenantId::new(s)
    }
}

/// Why a string is not a valid [`TenantId`].
///
/// ```
/// # use shard_router::{TenantId, TenantIdError};
/// assert_eq!(TenantId::new("a b"), Err(TenantIdError::ForbiddenChar { position: 1 }));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TenantIdError {
    /// The id is empty.
    #[error("tenant id is empty")]
    Empty,
    /// The id is longer than [`MAX_TENANT_ID_LEN`] bytes.
    #[error("tenant id is {len} bytes long; the limit is {MAX_TENANT_ID_LEN}")]
    TooLong {
        /// The length that was offered.
        len: usize,
    },
    /// The id does not start with an ASCII letter or digit.
    #[error("tenant id must start with an ASCII letter or digit")]
    BadStart,
    /// The id holds a byte outside `[A-Za-z0-9_.-]`.
    #[error("tenant id has a forbidden character at byte {position}; allowed: A-Z a-z 0-9 _ - .")]
    ForbiddenChar {
        /// Byte offset of the first forbidden character.
        position: usize,
    },
    /// The id is not valid UTF-8.
    #[error("tenant id is not valid UTF-8")]
    NotUtf8,
}

/// Why no tenant could be taken from a request.
///
/// ```
/// # use shard_router::tenant::ExtractError;
/// let err = ExtractError::Missing { what: "header x-tenant-id" };
/// assert_eq!(err.to_string(), "no tenant id in the request (looked for header x-tenant-id)");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExtractError {
    /// The place the extractor reads holds nothing.
    #[error("no tenant id in the request (looked for {what})")]
    Missing {
        /// Where the extractor looked, for logs.
        what: &'static str,
    },
    /// Something was there, but it is not a valid tenant id.
    #[error("invalid tenant id")]
    Invalid(#[from] TenantIdError),
    /// The request names two different tenants (say, the tenant header twice
    /// with different values); refused rather than picking one.
    #[error("two different tenant ids in the request ({what})")]
    Ambiguous {
        /// Where the extractor looked, for logs.
        what: &'static str,
    },
}

/// Finds the tenant of a request.
///
/// Implemented by the ready extractors of this module and by every closure
/// `Fn(&http::request::Parts) -> Result<TenantId, ExtractError>`, for example one
/// that reads claims an authentication layer put into the request's extensions.
///
/// # Example
///
/// ```
/// use shard_router::tenant::{ExtractError, TenantExtractor};
/// use shard_router::TenantId;
///
/// #[derive(Clone)]
/// struct Claims { org: String }
///
/// let from_claims = |parts: &http::request::Parts| {
///     let claims = parts.extensions.get::<Claims>()
///         .ok_or(ExtractError::Missing { what: "auth claims" })?;
///     Ok(TenantId::new(&claims.org)?)
/// };
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(Claims { org: "acme".into() });
/// let (parts, _) = req.into_parts();
/// assert_eq!(from_claims.extract(&parts).unwrap().as_str(), "acme");
/// ```
pub trait TenantExtractor {
    /// Returns the tenant of the request whose head is `parts`.
    fn extract(&self, parts: &Parts) -> Result<TenantId, ExtractError>;
}

impl<F> TenantExtractor for F
where
    F: Fn(&Parts) -> Result<TenantId, ExtractError>,
{
    fn extract(&self, parts: &Parts) -> Result<TenantId, ExtractError> {
        self(parts)
    }
}

/// Reads the tenant from a request header; `x-tenant-id` by default.
///
/// Works for gRPC too: tonic metadata travels as HTTP/2 headers.
///
/// ```
/// use shard_router::tenant::{HeaderExtractor, TenantExtractor};
///
/// let extractor = HeaderExtractor::new(http::HeaderName::from_static("x-org"));
/// let (parts, _) = http::Request::builder().header("x-org", "acme").body(()).unwrap().into_parts();
/// assert_eq!(extractor.extract(&parts).unwrap().as_str(), "acme");
/// ```
#[derive(Debug, Clone)]
pub struct HeaderExtractor {
    name: HeaderName,
}

impl HeaderExtractor {
    /// Reads the header `name`.
    ///
    /// ```
    /// # use shard_router::tenant::HeaderExtractor;
    /// let _ = HeaderExtractor::new(http::HeaderName::from_static("x-org"));
    /// ```
    pub fn new(name: HeaderName) -> Self {
        HeaderExtractor { name }
    }
}

impl Default for HeaderExtractor {
    fn default() -> Self {
        HeaderExtractor::new(HeaderName::from_static("x-tenant-id"))
    }
}

impl TenantExtractor for HeaderExtractor {
    fn extract(&self, parts: &Parts) -> Result<TenantId, ExtractError> {
        let mut values = parts.headers.get_all(&self.name).iter();
        let value = values.next().ok_or(ExtractError::Missing {
            what: "the tenant header",
        })?;
        // Two different values would make the tenant ambiguous: refuse rather than pick one.
        if values.any(|other| other != value) {
            return Err(ExtractError::Ambiguous {
                what: "the tenant header",
            });
        }
        Ok(TenantId::from_bytes(value.as_bytes())?)
    }
}

/// Reads the tenant from the first label of the host under a base domain:
/// `acme.example.com` with base `example.com` is tenant `acme`.
///
/// The host comes from the URI's authority (HTTP/2's `:authority`, which takes
/// precedence over a `Host` header), or else from the `Host` header.
/// Host names are case-insensitive, so the label is lowercased. A port is ignored.
///
/// ```
/// use shard_router::tenant::{SubdomainExtractor, TenantExtractor};
///
/// let extractor = SubdomainExtractor::new("example.com");
/// let (parts, _) = http::Request::builder()
///     .header("host", "Acme.example.com:8080").body(()).unwrap().into_parts();
/// assert_eq!(extractor.extract(&parts).unwrap().as_str(), "acme");
/// ```
#[derive(Debug, Clone)]
pub struct SubdomainExtractor {
    /// `.example.com`, lowercased, with its leading dot.
    suffix: String,
}

impl SubdomainExtractor {
    /// Takes tenants from hosts one label below `base_domain`.
    ///
    /// ```
    /// # use shard_router::tenant::SubdomainExtractor;
    /// let _ = SubdomainExtractor::new("example.com");
    /// ```
    pub fn new(base_domain: &str) -> Self {
        let base = base_domain.trim_start_matches('.').to_ascii_lowercase();
        SubdomainExtractor {
            suffix: format!(".{base}"),
        }
    }
}

impl TenantExtractor for SubdomainExtractor {
    fn extract(&self, parts: &Parts) -> Result<TenantId, ExtractError> {
        const WHAT: &str = "a subdomain of the base domain in the host";
        // The URI's authority first: HTTP/2 carries the host there (`:authority`,
        // which takes precedence over any `Host` header), as does an
        // absolute-form HTTP/1.1 request; otherwise the `Host` header.
        let host = match parts.uri.host() {
            Some(host) => host,
            None => parts
                .headers
                .get(http::header::HOST)
                .ok_or(ExtractError::Missing { what: WHAT })?
                .to_str()
                .map_err(|_| TenantIdError::NotUtf8)?,
        };
        let host = host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                host
            }
        });
        let host = host.to_ascii_lowercase();
        let label = host
            .strip_suffix(&self.suffix)
            .ok_or(ExtractError::Missing { what: WHAT })?;
        if label.contains('.') {
            // `a.b.example.com` is not one label: refuse instead of guessing which.
            return Err(TenantIdError::ForbiddenChar {
                position: label.find('.').unwrap_or(0),
            }
            .into());
        }
        Ok(TenantId::new(label)?)
    }
}

/// Reads the tenant from a segment of the request path, counted from 0:
/// with index 1, `/t/acme/notes` is tenant `acme`.
///
/// The segment is used as it is, not percent-decoded: an encoded id is refused
/// because `%` is not allowed in tenant ids.
///
/// ```
/// use shard_router::tenant::{PathSegmentExtractor, TenantExtractor};
///
/// let extractor = PathSegmentExtractor::new(1);
/// let (parts, _) = http::Request::get("/t/acme/notes").body(()).unwrap().into_parts();
/// assert_eq!(extractor.extract(&parts).unwrap().as_str(), "acme");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct PathSegmentExtractor {
    index: usize,
}

impl PathSegmentExtractor {
    /// Reads segment `index` (0 is the first segment after the leading `/`).
    ///
    /// ```
    /// # use shard_router::tenant::PathSegmentExtractor;
    /// let _ = PathSegmentExtractor::new(0);
    /// ```
    pub fn new(index: usize) -> Self {
        PathSegmentExtractor { index }
    }
}

impl TenantExtractor for PathSegmentExtractor {
    fn extract(&self, parts: &Parts) -> Result<TenantId, ExtractError> {
        let segment = parts
            .uri
            .path()
            .trim_start_matches('/')
            .split('/')
            .nth(self.index)
            .filter(|segment| !segment.is_empty())
            .ok_or(ExtractError::Missing {
                what: "the tenant path segment",
            })?;
        Ok(TenantId::new(segment)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parts(builder: http::request::Builder) -> Parts {
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn a_header_twice_with_two_tenants_is_ambiguous_and_twice_the_same_is_fine() {
        let extractor = HeaderExtractor::default();
        let two = parts(
            http::Request::builder()
                .header("x-tenant-id", "acme")
                .header("x-tenant-id", "globex"),
        );
        assert_eq!(
            extractor.extract(&two),
            Err(ExtractError::Ambiguous {
                what: "the tenant header"
            })
        );
        assert_eq!(
            crate::Rejection::from(&extractor.extract(&two).unwrap_err()).status(),
            400
        );
        let same = parts(
            http::Request::builder()
                .header("x-tenant-id", "acme")
                .header("x-tenant-id", "acme"),
        );
        assert_eq!(extractor.extract(&same).unwrap().as_str(), "acme");
    }

    #[test]
    fn ids_follow_the_documented_rules() {
        assert!(TenantId::new("a").is_ok());
        assert!(TenantId::new(&"a".repeat(64)).is_ok());
        assert_eq!(
            TenantId::new(&"a".repeat(65)),
            Err(TenantIdError::TooLong { len: 65 })
        );
        assert_eq!(TenantId::new("-a"), Err(TenantIdError::BadStart));
        assert_eq!(TenantId::new(""), Err(TenantIdError::Empty));
        // A Cyrillic 'а' that looks like a Latin 'a'.
        assert_eq!(TenantId::new("\u{430}cme"), Err(TenantIdError::BadStart));
        assert_eq!(
            TenantId::new("ac\u{430}me"),
            Err(TenantIdError::ForbiddenChar { position: 2 })
        );
        assert_eq!(TenantId::from_bytes(b"ab\xff"), Err(TenantIdError::NotUtf8));
    }

    #[test]
    fn header_extractor_rejects_missing_empty_and_ambiguous() {
        let ex = HeaderExtractor::default();
        assert!(matches!(
            ex.extract(&parts(http::Request::builder())),
            Err(ExtractError::Missing { .. })
        ));
        assert_eq!(
            ex.extract(&parts(http::Request::builder().header("x-tenant-id", ""))),
            Err(ExtractError::Invalid(TenantIdError::Empty))
        );
    }

    #[test]
    fn subdomain_extractor_prefers_the_authority_of_http2_over_host() {
        let extractor = SubdomainExtractor::new("example.com");
        let (parts, _) = http::Request::builder()
            .version(http::Version::HTTP_2)
            .uri("https://globex.example.com/notes")
            .header("host", "acme.example.com")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(extractor.extract(&parts).unwrap().as_str(), "globex");
        let (parts, _) = http::Request::builder()
            .uri("/notes")
            .header("host", "acme.example.com")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(extractor.extract(&parts).unwrap().as_str(), "acme");
    }

    #[test]
    fn subdomain_extractor_needs_exactly_one_label() {
        let ex = SubdomainExtractor::new("example.com");
        let with_host = |h: &str| parts(http::Request::builder().header("host", h));
        assert_eq!(
            ex.extract(&with_host("acme.example.com")).unwrap().as_str(),
            "acme"
        );
        assert!(ex.extract(&with_host("example.com")).is_err());
        assert!(ex.extract(&with_host("a.b.example.com")).is_err());
        assert!(ex.extract(&with_host("acme.evil.com")).is_err());
        assert!(ex.extract(&with_host("acme.example.com.evil.com")).is_err());
    }

    #[test]
    fn path_extractor_reads_the_nth_segment() {
        let ex = PathSegmentExtractor::new(0);
        let get = |p: &str| parts(http::Request::get(p));
        assert_eq!(ex.extract(&get("/acme/notes")).unwrap().as_str(), "acme");
        assert!(ex.extract(&get("/")).is_err());
        assert!(ex.extract(&get("/ac%27me/notes")).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_valid_ids_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(id) = TenantId::from_bytes(&bytes) {
                prop_assert!(id.as_str().len() <= MAX_TENANT_ID_LEN);
                prop_assert!(id.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)));
            }
        }

        #[test]
        fn sql_metacharacters_are_always_refused(prefix in "[a-z]{1,8}", meta in "['\";\\\\ ()%*=]", suffix in "[a-z]{0,8}") {
            let id = format!("{prefix}{meta}{suffix}");
            prop_assert!(TenantId::new(&id).is_err());
        }
    }
}
