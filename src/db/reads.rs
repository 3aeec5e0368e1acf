//! Where a read goes: a read replica of the tenant's shard when one is healthy,
//! within its lag bound and past the client's last write, else the primary.

use std::time::Duration;

use super::{Source, TenantClient, TenantDb};
use crate::map::Reason;
use crate::read_token::ReadToken;
use crate::replicas::{lsn_text, Lsn};

/// What a replica must have replayed before it serves this handle's reads.
#[derive(Clone, Debug)]
pub(super) enum ReadAfter {
    /// Nothing: any replica within its lag bound.
    Nothing,
    /// The client's last write on this tenant.
    /// Boxed: a token is 64 bytes, rare, and every handle (moved and cloned
    /// several times a request) would otherwise carry its room.
    Token(Box<ReadToken>),
    /// Unknown (a token that could not be read): the primary.
    Primary,
}

/// How long a read carrying a token waits for a replica to replay past it
/// before it goes to the primary, and how often it looks.
const TOKEN_WAIT: Duration = Duration::from_millis(20);
const TOKEN_POLL: Duration = Duration::from_millis(5);

impl TenantDb {
    /// This handle, reading from replicas only once they have replayed the
    /// write `token` stands for (when it is this tenant's, on this shard). A
    /// token of another tenant is ignored; one of another shard (the tenant
    /// moved since) sends reads to the primary. The layer does this with the
    /// `x-shard-router-token` request header; a background job can do it with
    /// a token the request handed over.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter, TenantId, ReadToken};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 2\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// let token: ReadToken = "v2.a.0123456789ABCDEF01234567.acme".parse().unwrap();
    /// let db = router.resolve(TenantId::new("acme").unwrap()).with_token(token);
    /// # }
    /// ```
    pub fn with_token(mut self, token: ReadToken) -> Self {
        if token.tenant() != self.tenant.as_str() {
            return self;
        }
        self.read_after = if token.shard() == self.shard() {
            ReadAfter::Token(Box::new(token))
        } else {
            ReadAfter::Primary
        };
        self
    }

    /// This handle, with every read on the shard's primary (never a replica).
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter, TenantId};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 2\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// let db = router.resolve(TenantId::new("acme").unwrap()).read_primary();
    /// # }
    /// ```
    pub fn read_primary(mut self) -> Self {
        self.read_after = ReadAfter::Primary;
        self
    }

    /// The token of the last write committed through this handle or a clone
    /// of it, when the tenant's shard has replicas (`None` otherwise): pass it
    /// to [`with_token`](Self::with_token) later to read that write back from
    /// a replica. The layer returns it in the `x-shard-router-token` header.
    ///
    /// ```
    /// # use shard_router::{map::MapLoader, ShardRouter, TenantId};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let router = ShardRouter::new(MapLoader::without_env().load_str("version = 2\n[shards.a]\nurl = \"postgres://h/a\"").unwrap()).unwrap();
    /// let db = router.resolve(TenantId::new("acme").unwrap());
    /// assert_eq!(db.token(), None); // nothing written, and no replicas
    /// # }
    /// ```
    pub fn token(&self) -> Option<ReadToken> {
        let slot = self.written.as_ref()?;
        slot.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records that a write committed on the primary at `lsn`.
    pub(super) fn wrote(&self, lsn: Option<Lsn>) {
        let (Some(slot), Some(lsn)) = (&self.written, lsn) else {
            return;
        };
        let Some(replicas) = self.table.read_replicas(self.location.shard) else {
            return;
        };
        let key = &replicas.token_key;
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        // The later of this write and the handle's earlier ones on this shard.
        let earlier = slot
            .as_ref()
            .filter(|t| t.shard() == self.shard())
            .and_then(|t| t.open(key));
        if earlier.is_none_or(|earlier| earlier < lsn) {
            *slot = Some(ReadToken::seal(
                key,
                self.shard(),
                self.tenant.as_str(),
                lsn,
            ));
        }
    }

    /// The slot the layer reads the token from after the handler ran.
    pub(crate) fn written_slot(&self) -> Option<super::WrittenSlot> {
        self.written.clone()
    }

    /// Whether writes should report their commit position (the shard has
    /// replicas to read them back from).
    pub(super) fn wants_position(&self) -> bool {
        self.written.is_some()
    }

    /// A client on a replica fit to serve this read, or `None` for the primary.
    pub(super) async fn replica_read(&self) -> Option<TenantClient> {
        let shard = self.location.shard;
        // A moving tenant reads from the primary in every phase: its rows on
        // the target arrive by backfill and row images, and a replica of
        // either side could hold them older than the fence.
        if matches!(self.location.reason, Reason::Move(_)) {
            return None;
        }
        let replicas = self.table.read_replicas(shard)?;
        let key = &replicas.token_key;
        let own = self.token().and_then(|t| t.open(key));
        let min = match &self.read_after {
            ReadAfter::Primary => return None,
            // A token that does not open (altered, made up, or sealed under
            // another URL or secret) proves nothing: the primary serves.
            ReadAfter::Token(token) => Some(token.open(key)?.max(own.unwrap_or(0))),
            ReadAfter::Nothing => own,
        };
        if let Some(i) = replicas.pick(min) {
            return self.replica_client(i).await;
        }
        // Past the lag bound, or not yet past the token by the last probe:
        // ask a healthy replica itself, briefly, then give up for the primary.
        let (Some(min), Some(i)) = (min, replicas.any_healthy()) else {
            return None;
        };
        let client = self.replica_client(i).await?;
        let wanted = lsn_text(min);
        let deadline = tokio::time::Instant::now() + TOKEN_WAIT;
        loop {
            let caught_up = client
                .raw()
                .query_one(
                    "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                    &[&wanted],
                )
                .await
                .ok()?
                .get::<_, bool>(0);
            if caught_up {
                return Some(client);
            }
            if tokio::time::Instant::now() + TOKEN_POLL > deadline {
                return None;
            }
            tokio::time::sleep(TOKEN_POLL).await;
        }
    }

    /// A checkout from replica `i`; a replica that fails it serves no reads
    /// until a probe finds it back.
    async fn replica_client(&self, i: usize) -> Option<TenantClient> {
        let shard = self.location.shard;
        let replicas = self.table.read_replicas(shard)?;
        match self.checkout_from(shard, Source::ReadReplica(i)).await {
            Ok(client) => {
                replicas.served(i);
                Some(client)
            }
            // A busy pool (or the tenant at its cap there) is no sign of a
            // replica down: this read goes to the primary, the next may not.
            Err(crate::DbError::Unavailable { cause, .. })
                if matches!(
                    *cause,
                    deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)
                ) =>
            {
                None
            }
            Err(e) => {
                replicas.failed(i, e.report().to_string());
                None
            }
        }
    }
}

impl TenantClient {
    /// Whether this client is on a read replica rather than the shard's
    /// primary.
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let client = db.read().await?;
    /// println!("served by a replica: {}", client.on_replica());
    /// # Ok(()) }
    /// ```
    pub fn on_replica(&self) -> bool {
        self.replica.is_some()
    }
}
