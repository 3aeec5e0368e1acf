//! A write transaction as a closure, run again on a serialization failure,
//! a deadlock, or a move's fence refusal (once the router has the newer map).

use std::time::Duration;

use futures_util::future::BoxFuture;

use super::*;

/// How many times [`TenantDb::transaction`] runs its closure at most.
pub const TRANSACTION_ATTEMPTS: u32 = 4;

/// How long a fenced attempt waits for the router to apply a newer map.
const NEWER_MAP_WAIT: Duration = Duration::from_secs(2);

impl TenantDb {
    /// Runs `work` in a write transaction ([`TenantDb::write`]) and commits it.
    ///
    /// When a statement or the `COMMIT` fails with a serialization failure or
    /// a deadlock (SQLSTATE `40001`, `40P01`), the transaction is rolled back
    /// and `work` runs again from the start after a short, growing pause. When
    /// a move's fence refuses the write (this handle's map is older than the
    /// one the shard requires), it waits up to 2 s for the router to apply a
    /// newer map and runs `work` again on it, on whichever shard that map
    /// names. At most [`TRANSACTION_ATTEMPTS`] runs; any other error, or an
    /// error `work` returns itself, comes back at once (after the rollback).
    /// `work` must therefore be safe to run more than once: keep side effects
    /// outside the database until this returns.
    ///
    /// ```no_run
    /// # async fn f(db: shard_router::TenantDb) -> Result<(), shard_router::DbError> {
    /// let tenant = db.tenant().as_str().to_owned();
    /// let total: i64 = db
    ///     .transaction(|w| {
    ///         let tenant = tenant.clone();
    ///         Box::pin(async move {
    ///             w.execute("UPDATE invoices SET paid = true WHERE tenant_id = $1 AND id = 7", &[&tenant])
    ///                 .await?;
    ///             let row = w
    ///                 .query_one("SELECT coalesce(sum(amount), 0)::bigint FROM invoices WHERE tenant_id = $1 AND paid", &[&tenant])
    ///                 .await?;
    ///             Ok(row.get(0))
    ///         })
    ///     })
    ///     .await?;
    /// # let _ = total; Ok(()) }
    /// ```
    pub async fn transaction<T, F>(&self, mut work: F) -> Result<T, DbError>
    where
        F: for<'w> FnMut(&'w mut TenantWriter) -> BoxFuture<'w, Result<T, DbError>>,
    {
        let mut db = self.clone();
        let mut attempt = 1;
        loop {
            let result = async {
                let mut writer = db.write().await?;
                match work(&mut writer).await {
                    Ok(value) => writer.commit().await.map(|()| value),
                    Err(e) => {
                        let _ = writer.rollback().await;
                        Err(e)
                    }
                }
            }
            .await;
            let err = match result {
                Ok(value) => return Ok(value),
                Err(e) if attempt >= TRANSACTION_ATTEMPTS => return Err(e),
                Err(e) => e,
            };
            match err.kind() {
                DbErrorKind::SerializationFailure => {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                DbErrorKind::Fenced => match db.newer_map(NEWER_MAP_WAIT).await {
                    Some(newer) => db = newer,
                    None => return Err(err),
                },
                _ => return Err(err),
            }
            attempt += 1;
        }
    }

    /// This handle on the router's newer map, once the router has one (within
    /// `wait`); the request's token slot, tally and read position carry over.
    async fn newer_map(&self, wait: Duration) -> Option<TenantDb> {
        let router = self.router.as_ref()?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if router.version() > self.map_version() {
                let mut fresh = router.resolve(self.tenant.clone());
                fresh.read_after = self.read_after.clone();
                fresh.tally = self.tally.clone();
                if self.written.is_some() {
                    fresh.written = self.written.clone();
                }
                return Some(fresh);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// 5, 10, 20 ms ... plus up to as much again, so retries of two conflicting
/// transactions drift apart.
fn backoff(attempt: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let base = 5u64 << (attempt - 1).min(6);
    let jitter = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        % (base + 1);
    Duration::from_millis(base + jitter)
}

#[cfg(test)]
mod tests {
    use super::backoff;

    #[test]
    fn backoff_grows_and_stays_within_twice_its_base() {
        for attempt in 1..=4 {
            let base = 5u64 << (attempt - 1);
            let pause = backoff(attempt).as_millis() as u64;
            assert!((base..=2 * base).contains(&pause), "{attempt}: {pause}");
        }
    }
}
