//! Read replicas: per-shard replica pools, background lag probes, the choice
//! of where a read goes (the read-your-writes token is `read_token`'s).
//!
//! A replica's lag is measured without touching the request path: a probe
//! (every quarter of the shard's `max_replica_lag_ms`, between 50 ms and 1 s)
//! records the primary's WAL position with the time, then reads the replica's
//! replay position. A replica that has replayed what the primary had at time
//! `t` is at most `now - t` behind; that bound is its lag. A replica that
//! cannot be reached, is not in recovery, or lags past the bound serves no
//! reads until a later probe finds it caught up.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;

use crate::map::Shard;
use crate::read_token::TokenKey;

/// A WAL position (`pg_lsn`), as a number.
pub(crate) type Lsn = u64;

/// The `pg_lsn` text form of `lsn` (`16/B374D848`).
pub(crate) fn lsn_text(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// The reads of one shard's replicas, and how each replica is doing.
pub(crate) struct ShardReplicas {
    pub(crate) replicas: Vec<ReplicaState>,
    max_lag: Duration,
    /// The primary's WAL position at recent probes, oldest first.
    samples: Mutex<VecDeque<(Instant, Lsn)>>,
    /// Spreads reads over the replicas by weight.
    next: AtomicUsize,
    /// Seals and opens the shard's read tokens.
    pub(crate) token_key: TokenKey,
}

/// One replica: its pool and what the last probe found.
pub(crate) struct ReplicaState {
    pub(crate) pool: Pool,
    /// One connection of its own for the lag probe: a pool busy with reads
    /// must not make the replica look down.
    probe_pool: Pool,
    /// The per-tenant cap on this replica's pool (`tenant_max_connections`
    /// of the replica's `pool`, else the shard's).
    pub(crate) limiter: Option<std::sync::Arc<crate::limit::TenantLimiter>>,
    pub(crate) redacted_url: String,
    weight: u32,
    healthy: AtomicBool,
    /// Milliseconds behind (an upper bound); `u64::MAX` until known.
    lag_ms: AtomicU64,
    replay: AtomicU64,
    reads: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// What `GET /_router` shows of a replica.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ReplicaStatus {
    /// The replica's URL, password redacted.
    pub url: String,
    /// Serving reads: reachable, in recovery, and within the lag bound.
    pub healthy: bool,
    /// How far behind its primary, at most, at the last probe (None: unknown).
    pub lag_ms: Option<u64>,
    /// Reads it has served.
    pub reads: u64,
    /// Why the last probe failed, if it did.
    pub error: Option<String>,
}

impl ShardReplicas {
    /// The replica pools of `shard`, or `None` when it lists no replica.
    pub(crate) fn build(shard: &Shard) -> Result<Option<ShardReplicas>, String> {
        if shard.replicas().is_empty() {
            return Ok(None);
        }
        let mut replicas = Vec::with_capacity(shard.replicas().len());
        for replica in shard.replicas() {
            let connector = replica.endpoint.tls.connector()?;
            let pool = crate::pg::pool_for(
                &replica.endpoint.config,
                &replica.pool().limits(),
                connector.clone(),
                false,
                Some(shard.name()),
            )?;
            let probe_limits = crate::pg::PoolLimits {
                max_size: 1,
                ..replica.pool().limits()
            };
            let probe_pool = crate::pg::pool_for(
                &replica.endpoint.config,
                &probe_limits,
                connector,
                false,
                None,
            )?;
            let limiter = replica
                .pool()
                .tenant_max_connections
                .or(shard.pool().tenant_max_connections)
                .map(|max| std::sync::Arc::new(crate::limit::TenantLimiter::new(max)));
            replicas.push(ReplicaState {
                pool,
                probe_pool,
                limiter,
                redacted_url: replica.redacted_url(),
                weight: replica.weight(),
                healthy: AtomicBool::new(false),
                lag_ms: AtomicU64::new(u64::MAX),
                replay: AtomicU64::new(0),
                reads: AtomicU64::new(0),
                last_error: Mutex::new(None),
            });
        }
        Ok(Some(ShardReplicas {
            replicas,
            max_lag: shard.max_replica_lag(),
            samples: Mutex::new(VecDeque::new()),
            next: AtomicUsize::new(0),
            token_key: TokenKey::for_shard(shard),
        }))
    }

    /// How often to probe: a quarter of the lag bound, between 50 ms and 1 s.
    pub(crate) fn probe_interval(&self) -> Duration {
        (self.max_lag / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// A replica to read from: healthy, within the lag bound, and (when the
    /// reader carries a token) known to have replayed past `min_lsn`. Spread
    /// by weight. `None`: read from the primary.
    pub(crate) fn pick(&self, min_lsn: Option<Lsn>) -> Option<usize> {
        let eligible = |r: &ReplicaState| {
            r.weight > 0
                && r.healthy.load(Ordering::Acquire)
                && min_lsn.is_none_or(|min| r.replay.load(Ordering::Acquire) >= min)
        };
        let total: u64 = self
            .replicas
            .iter()
            .filter(|r| eligible(r))
            .map(|r| r.weight as u64)
            .sum();
        if total == 0 {
            return None;
        }
        let mut ticket = self.next.fetch_add(1, Ordering::Relaxed) as u64 % total;
        for (i, replica) in self.replicas.iter().enumerate() {
            if !eligible(replica) {
                continue;
            }
            if ticket < replica.weight as u64 {
                return Some(i);
            }
            ticket -= replica.weight as u64;
        }
        None
    }

    /// Any replica healthy and within bound, whatever it has replayed.
    pub(crate) fn any_healthy(&self) -> Option<usize> {
        self.replicas
            .iter()
            .position(|r| r.weight > 0 && r.healthy.load(Ordering::Acquire))
    }

    /// Counts a read served by replica `i`.
    pub(crate) fn served(&self, i: usize) {
        self.replicas[i].reads.fetch_add(1, Ordering::Relaxed);
    }

    /// A read found replica `i` unreachable: no more reads until a probe
    /// finds it back.
    pub(crate) fn failed(&self, i: usize, why: String) {
        let replica = &self.replicas[i];
        replica.healthy.store(false, Ordering::Release);
        *replica.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// One probe: the primary's position, then every replica's.
    pub(crate) async fn probe(&self, primary: &Pool) {
        let now = Instant::now();
        match position(primary, POSITION_ON_PRIMARY).await {
            Ok(Some(lsn)) => {
                let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
                samples.push_back((now, lsn));
                // Enough history to tell any lag up to the bound, and more.
                let keep = self.max_lag * 2 + Duration::from_secs(1);
                while samples
                    .front()
                    .is_some_and(|(at, _)| now.duration_since(*at) > keep)
                {
                    samples.pop_front();
                }
            }
            // Without the primary's position no lag is known: keep the last
            // verdicts (the primary being down is the shard's problem, not
            // the replicas').
            _ => return,
        }
        for replica in &self.replicas {
            let result = position(&replica.probe_pool, POSITION_ON_REPLICA).await;
            let verdict = match result {
                Ok(Some(replay)) => {
                    replica.replay.store(replay, Ordering::Release);
                    match self.lag_of(replay, Instant::now()) {
                        Some(lag) if lag <= self.max_lag => Ok(lag),
                        Some(lag) => Err(format!(
                            "{} ms behind, over the bound of {} ms",
                            lag.as_millis(),
                            self.max_lag.as_millis()
                        )),
                        None => Err("further behind than the probes remember".to_owned()),
                    }
                }
                Ok(None) => Err("not in recovery: not a streaming replica".to_owned()),
                Err(e) => Err(e),
            };
            match verdict {
                Ok(lag) => {
                    replica
                        .lag_ms
                        .store(lag.as_millis() as u64, Ordering::Release);
                    *replica.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    replica.healthy.store(true, Ordering::Release);
                }
                Err(why) => {
                    if replica.healthy.swap(false, Ordering::AcqRel) {
                        tracing::warn!(replica = %replica.redacted_url, reason = %why, "replica excluded from reads");
                    }
                    *replica.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                }
            }
        }
    }

    /// How far behind a replica that replayed up to `replay` is at most: the
    /// time since the newest probe at which the primary had nothing beyond
    /// it. Zero when it has everything the primary had at the last probe.
    fn lag_of(&self, replay: Lsn, now: Instant) -> Option<Duration> {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let (_, newest) = samples.back()?;
        if replay >= *newest {
            return Some(Duration::ZERO);
        }
        samples
            .iter()
            .rev()
            .find(|(_, lsn)| *lsn <= replay)
            .map(|(at, _)| now.duration_since(*at))
    }

    /// What `/_router` shows.
    pub(crate) fn status(&self) -> Vec<ReplicaStatus> {
        self.replicas
            .iter()
            .map(|r| {
                let lag = r.lag_ms.load(Ordering::Acquire);
                ReplicaStatus {
                    url: r.redacted_url.clone(),
                    healthy: r.healthy.load(Ordering::Acquire),
                    lag_ms: (lag != u64::MAX).then_some(lag),
                    reads: r.reads.load(Ordering::Relaxed),
                    error: r
                        .last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone(),
                }
            })
            .collect()
    }
}

/// The primary's WAL position: after a commit on the same connection, past
/// that commit.
pub(crate) const POSITION_ON_PRIMARY: &str = "SELECT (pg_current_wal_lsn() - '0/0')::bigint";
/// NULL on a server that is not in recovery.
const POSITION_ON_REPLICA: &str = "SELECT (pg_last_wal_replay_lsn() - '0/0')::bigint";

/// Runs one of the position queries on a pooled connection, within a second.
async fn position(pool: &Pool, sql: &str) -> Result<Option<Lsn>, String> {
    let run = async {
        let client = pool.get().await.map_err(|e| e.to_string())?;
        let row = client
            .query_one(sql, &[])
            .await
            .map_err(|e| crate::pg::error_text(&e))?;
        Ok(row.get::<_, Option<i64>>(0).map(|lsn| lsn as Lsn))
    };
    match tokio::time::timeout(Duration::from_secs(1), run).await {
        Ok(result) => result,
        Err(_) => Err("no answer within 1 s".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_is_postgres_form() {
        assert_eq!(lsn_text(0x16_B374_D848), "16/B374D848");
        assert_eq!(lsn_text(0), "0/0");
    }
}
