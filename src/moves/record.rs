//! The one module that reads and writes `shard_router_moves`: the move record,
//! its lease and fencing token, and the intent recorded before each publish.

use std::time::Duration;

use tokio_postgres::Row;

use super::{MoveError, MoveStatus};
use crate::control::{ControlError, ControlPlane};
use crate::TenantId;

const SELECT: &str = "SELECT tenant, from_shard, to_shard, phase, state::text, error, intent, \
     lease_holder, greatest(0, extract(epoch FROM lease_until - clock_timestamp()) * 1000)::bigint \
     FROM shard_router_moves";

fn status_of(r: &Row) -> MoveStatus {
    MoveStatus {
        tenant: r.get(0),
        from: r.get(1),
        to: r.get(2),
        phase: r.get(3),
        state: serde_json::from_str(r.get::<_, &str>(4)).unwrap_or_default(),
        error: r.get(5),
        intent: r.get(6),
        lease_holder: r.get(7),
        lease_left_ms: r.get::<_, Option<i64>>(8).map(|ms| ms as u64),
    }
}

/// The tenant's move as recorded, if it ever had one.
pub(crate) async fn load(
    control: &ControlPlane,
    tenant: &TenantId,
) -> Result<Option<MoveStatus>, MoveError> {
    let row = control
        .client
        .query_opt(&format!("{SELECT} WHERE tenant = $1"), &[&tenant.as_str()])
        .await
        .map_err(ControlError::from)?;
    Ok(row.as_ref().map(status_of))
}

/// Who this mover is, as a lease holder: host, process, and a number that
/// tells apart the movers of one process (and a process restarted with the
/// same pid, through its start time).
fn holder() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static STARTED: OnceLock<u128> = OnceLock::new();
    let started = STARTED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros())
    });
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    format!(
        "{host}:{}:{:x}.{}",
        std::process::id(),
        started % 0x1_0000_0000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A held lease: the fencing token and holder every record, publish and
/// shard-side step must present, and the session that holds the mover lock.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) token: i64,
    pub(crate) holder: String,
    pub(crate) duration: Duration,
    /// Dropped with the lease (or the mover): the lock ends with it.
    _session: MoverSession,
}

/// The mover's own control-database session, holding the tenant's mover lock
/// (`lock_keys::mover`): the lease's liveness. A session of its own, so the
/// lock never stacks on a shared connection and ends when the mover drops it,
/// crashes, or goes silent.
struct MoverSession {
    _client: tokio_postgres::Client,
}

impl std::fmt::Debug for MoverSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MoverSession")
    }
}

/// Takes the tenant's mover lock on a session of its own. `None`: another
/// live mover holds it.
async fn lock_mover(
    control: &ControlPlane,
    tenant: &TenantId,
) -> Result<Option<MoverSession>, MoveError> {
    let session = control.mover_session().await?;
    let locked: bool = session
        .query_one(
            "SELECT pg_try_advisory_lock($1)",
            &[&crate::pg::lock_keys::mover(tenant)],
        )
        .await
        .map_err(ControlError::from)?
        .get(0);
    Ok(locked.then_some(MoverSession { _client: session }))
}

/// Records a new move of `tenant` and takes its lease, unless the tenant has
/// an unfinished move (then [`MoveError::AlreadyMoving`]).
pub(crate) async fn create(
    control: &ControlPlane,
    tenant: &TenantId,
    from: &str,
    to: &str,
    duration: Duration,
    floor: i64,
) -> Result<Lease, MoveError> {
    let Some(session) = lock_mover(control, tenant).await? else {
        return Err(held(control, tenant).await);
    };
    let holder = holder();
    let row = control
        .client
        .query_opt(
            "INSERT INTO shard_router_moves (tenant, from_shard, to_shard, phase, state, lease_token, \
               lease_holder, lease_until) \
             VALUES ($1, $2, $3, 'starting', '{}', $6::bigint + 1, $4, clock_timestamp() + $5 * interval '1 millisecond') \
             ON CONFLICT (tenant) DO UPDATE SET from_shard = EXCLUDED.from_shard, \
               to_shard = EXCLUDED.to_shard, phase = 'starting', state = '{}', error = NULL, \
               intent = NULL, lease_token = greatest(shard_router_moves.lease_token, $6) + 1, \
               lease_holder = EXCLUDED.lease_holder, lease_until = EXCLUDED.lease_until, \
               started_at = now(), updated_at = now() \
             WHERE shard_router_moves.phase IN ('complete', 'aborted') \
             RETURNING lease_token",
            &[
                &tenant.as_str(),
                &from,
                &to,
                &holder,
                &(duration.as_millis() as f64),
                &floor,
            ],
        )
        .await
        .map_err(ControlError::from)?;
    match row {
        Some(row) => Ok(Lease {
            token: row.get(0),
            holder,
            duration,
            _session: session,
        }),
        None => {
            let phase = load(control, tenant)
                .await?
                .map(|m| m.phase)
                .unwrap_or_default();
            Err(MoveError::AlreadyMoving {
                tenant: tenant.to_string(),
                phase,
            })
        }
    }
}

/// Takes the lease of the tenant's recorded move, with a new token above
/// both the record's and `floor` (the highest claim on the move's shards: a
/// control database restored from a backup would otherwise hand out a token
/// the shards refuse), unless
/// another live mover holds it (then [`MoveError::LeaseHeld`]). Liveness is
/// the mover lock on the control database, held for the session: a mover
/// that died, or lost its connection, freed it at once.
pub(crate) async fn acquire(
    control: &ControlPlane,
    tenant: &TenantId,
    duration: Duration,
    floor: i64,
) -> Result<Lease, MoveError> {
    let Some(session) = lock_mover(control, tenant).await? else {
        return Err(held(control, tenant).await);
    };
    let holder = holder();
    let row = control
        .client
        .query_opt(
            "UPDATE shard_router_moves SET lease_token = greatest(lease_token, $4) + 1, \
               lease_holder = $2, \
               lease_until = clock_timestamp() + $3 * interval '1 millisecond', updated_at = now() \
             WHERE tenant = $1 \
             RETURNING lease_token",
            &[
                &tenant.as_str(),
                &holder,
                &(duration.as_millis() as f64),
                &floor,
            ],
        )
        .await
        .map_err(ControlError::from)?;
    match row {
        Some(row) => Ok(Lease {
            token: row.get(0),
            holder,
            duration,
            _session: session,
        }),
        None => Err(MoveError::NoMove {
            tenant: tenant.to_string(),
        }),
    }
}

/// [`MoveError::LeaseHeld`], naming the holder as recorded.
async fn held(control: &ControlPlane, tenant: &TenantId) -> MoveError {
    match load(control, tenant).await {
        Ok(Some(m)) => MoveError::LeaseHeld {
            tenant: tenant.to_string(),
            holder: m.lease_holder.unwrap_or_default(),
            left: Duration::from_millis(m.lease_left_ms.unwrap_or(0)),
        },
        Ok(None) => MoveError::LeaseHeld {
            tenant: tenant.to_string(),
            holder: "a mover starting it".to_owned(),
            left: Duration::ZERO,
        },
        Err(e) => e,
    }
}

/// Renews the lease and applies `set` (an SQL fragment of our own over columns
/// `$5`.. in `params`), only while `lease` is still the tenant's newest token
/// and holder. Fails with [`MoveError::LeaseLost`] when another mover took
/// over (or a restored control database no longer knows this lease).
async fn update(
    control: &ControlPlane,
    tenant: &TenantId,
    lease: &Lease,
    set: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<(), MoveError> {
    let sql = format!(
        "UPDATE shard_router_moves SET lease_until = clock_timestamp() + $2 * interval '1 millisecond', \
           updated_at = now(){set} \
         WHERE tenant = $1 AND lease_token = $3 AND lease_holder = $4"
    );
    let ms = lease.duration.as_millis() as f64;
    let name = tenant.as_str();
    let mut all: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        vec![&name as _, &ms as _, &lease.token as _, &lease.holder as _];
    all.extend_from_slice(params);
    let n = control
        .client
        .execute(&sql, &all)
        .await
        .map_err(ControlError::from)?;
    if n == 0 {
        return Err(MoveError::LeaseLost {
            tenant: tenant.to_string(),
        });
    }
    Ok(())
}

/// Renews the lease.
pub(crate) async fn renew(
    control: &ControlPlane,
    tenant: &TenantId,
    lease: &Lease,
) -> Result<(), MoveError> {
    update(control, tenant, lease, "", &[]).await
}

/// Records a finished step: the phase, a patch merged into the state, the error.
pub(crate) async fn phase(
    control: &ControlPlane,
    tenant: &TenantId,
    lease: &Lease,
    phase: &str,
    patch: serde_json::Value,
) -> Result<(), MoveError> {
    update(
        control,
        tenant,
        lease,
        ", phase = $5, state = state || $6::text::jsonb, error = NULL",
        &[&phase, &patch.to_string()],
    )
    .await
}

/// Merges a patch into the state, without changing the phase.
pub(crate) async fn progress(
    control: &ControlPlane,
    tenant: &TenantId,
    lease: &Lease,
    patch: serde_json::Value,
) -> Result<(), MoveError> {
    update(
        control,
        tenant,
        lease,
        ", state = state || $5::text::jsonb",
        &[&patch.to_string()],
    )
    .await
}

/// Records the map change about to be published (`dual_write`, `reversed`,
/// `complete` or `abort`), before it is published.
pub(crate) async fn intent(
    control: &ControlPlane,
    tenant: &TenantId,
    lease: &Lease,
    intent: &str,
) -> Result<(), MoveError> {
    update(control, tenant, lease, ", intent = $5", &[&intent]).await
}

/// Records the error a step stopped on (kept until a step succeeds).
pub(crate) async fn error(
    control: &ControlPlane,
    tenant: &TenantId,
    lease: &Lease,
    error: &str,
) -> Result<(), MoveError> {
    update(control, tenant, lease, ", error = $5", &[&error]).await
}

/// Records the lease given up; the mover lock ends when the lease is
/// dropped, which the caller does next.
pub(crate) async fn release(control: &ControlPlane, tenant: &TenantId, lease: &Lease) {
    let _ = control
        .client
        .execute(
            "UPDATE shard_router_moves SET lease_until = NULL, lease_holder = NULL \
             WHERE tenant = $1 AND lease_token = $2 AND lease_holder = $3",
            &[&tenant.as_str(), &lease.token, &lease.holder],
        )
        .await;
}
