//! Per-tenant caps on a shard's connections, so one hot tenant cannot take a
//! whole pool (`pool.tenant_max_connections` in the map).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One semaphore per tenant of one shard's pool.
#[derive(Debug)]
pub(crate) struct TenantLimiter {
    max: usize,
    tenants: Mutex<HashMap<Box<str>, Arc<Semaphore>>>,
}

/// Tenants tracked before idle ones are forgotten.
const FORGET_ABOVE: usize = 1024;

impl TenantLimiter {
    pub(crate) fn new(max: usize) -> Self {
        TenantLimiter {
            max,
            tenants: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for `tenant`, waiting at most `wait`; `None` when the tenant
    /// already holds its cap for that long.
    pub(crate) async fn acquire(
        &self,
        tenant: &str,
        wait: Duration,
    ) -> Option<OwnedSemaphorePermit> {
        let semaphore = {
            let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
            if tenants.len() > FORGET_ABOVE {
                // A semaphore nobody holds a permit of is idle: forget it.
                tenants.retain(|_, s| Arc::strong_count(s) > 1);
            }
            Arc::clone(
                tenants
                    .entry(tenant.into())
                    .or_insert_with(|| Arc::new(Semaphore::new(self.max))),
            )
        };
        tokio::time::timeout(wait, semaphore.acquire_owned())
            .await
            .ok()?
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tenant_gets_at_most_its_cap_and_others_are_unaffected() {
        let limiter = TenantLimiter::new(2);
        let wait = Duration::from_millis(20);
        let a1 = limiter.acquire("a", wait).await.unwrap();
        let _a2 = limiter.acquire("a", wait).await.unwrap();
        assert!(
            limiter.acquire("a", wait).await.is_none(),
            "third slot refused in time"
        );
        assert!(
            limiter.acquire("b", wait).await.is_some(),
            "another tenant is not affected"
        );
        drop(a1);
        assert!(
            limiter.acquire("a", wait).await.is_some(),
            "a returned slot is reusable"
        );
    }
}
