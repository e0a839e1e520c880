//! The streams one gateway serves at once, of every kind — tenant streams
//! (`GET /tenants/{t}/events`), extraction streams (`GET /extractions/{id}/events`) and
//! `POST /extractions?wait=true` waits — under two caps: one for the gateway
//! (`notifications.max-subscribers`; past it a stream is refused with a 503) and one per
//! tenant below it (`notifications.max-subscribers-per-tenant`; past it the tenant's new
//! stream is refused with a 429 and `Retry-After`, while other tenants' streams still
//! open). So one tenant cannot take every place a gateway has.
//!
//! [`StreamSlots`] is the one owner of both counts: a stream takes a [`Slot`] when it opens
//! and gives it back when dropped. Bounded: the per-tenant map holds only tenants with a
//! stream here (an entry goes with its tenant's last slot), so it has at most
//! `max-subscribers` entries. Callers without a tenant (auth off, no `X-Tenant-Id`) share
//! one count.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use shoal::gateway::ApiError;

/// What a tenant refused at its cap is told to wait before it tries again.
pub const TENANT_RETRY_AFTER: Duration = Duration::from_secs(5);

/// The caps and the counts under them. Cheap to clone (clones share the counts).
#[derive(Debug, Clone)]
pub struct StreamSlots {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    max: usize,
    per_tenant: usize,
    // A std mutex: admission is synchronous (a handler asks and is answered at once), the
    // lock is never held across an await, and a task owning the counts would add a round
    // trip to every stream for nothing.
    taken: Mutex<Taken>,
}

#[derive(Debug, Default)]
struct Taken {
    total: usize,
    by_tenant: HashMap<Option<String>, usize>,
}

/// Why a stream was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The gateway serves its maximum of streams (503).
    #[error("this gateway holds its maximum of {max} streams (`notifications.max-subscribers`)")]
    Gateway {
        /// `notifications.max-subscribers`.
        max: usize,
    },
    /// The caller's tenant holds its maximum of streams on this gateway (429).
    #[error(
        "{} holds its maximum of {max} streams on this gateway \
         (`notifications.max-subscribers-per-tenant`)",
        tenant_name(.tenant.as_deref())
    )]
    Tenant {
        /// The tenant (`None`: callers without one).
        tenant: Option<String>,
        /// `notifications.max-subscribers-per-tenant`.
        max: usize,
    },
}

fn tenant_name(tenant: Option<&str>) -> String {
    match tenant {
        Some(tenant) => format!("tenant `{tenant}`"),
        None => "the callers without a tenant".to_owned(),
    }
}

impl From<Refused> for ApiError {
    fn from(refused: Refused) -> Self {
        super::metrics::rejected();
        let message = refused.to_string();
        match refused {
            Refused::Gateway { .. } => ApiError::Unavailable {
                code: "too_many_subscribers",
                message,
                retry: shoal::retry::RetryClass::Safe,
            },
            Refused::Tenant { .. } => ApiError::TooManyRequests {
                code: "tenant_stream_limit",
                message,
                retry_after: TENANT_RETRY_AFTER,
            },
        }
    }
}

impl StreamSlots {
    /// At most `max` streams at once, and at most `per_tenant` of one tenant.
    pub fn new(max: usize, per_tenant: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                max,
                per_tenant,
                taken: Mutex::default(),
            }),
        }
    }

    /// The caps of `[notifications]`.
    pub fn of(config: &super::NotificationsConfig) -> Self {
        Self::new(config.max_subscribers, config.per_tenant_cap())
    }

    /// A place for one more stream of `tenant`, or why not (its own cap is checked first,
    /// so a tenant at its cap is told about its cap).
    pub fn admit(&self, tenant: Option<&str>) -> Result<Slot, Refused> {
        let inner = &self.inner;
        let mut taken = lock(&inner.taken);
        let key = tenant.map(str::to_owned);
        let of_tenant = taken.by_tenant.get(&key).copied().unwrap_or(0);
        if of_tenant >= inner.per_tenant {
            return Err(Refused::Tenant {
                tenant: key,
                max: inner.per_tenant,
            });
        }
        if taken.total >= inner.max {
            return Err(Refused::Gateway { max: inner.max });
        }
        taken.total += 1;
        *taken.by_tenant.entry(key.clone()).or_insert(0) += 1;
        super::metrics::subscribers(taken.total);
        Ok(Slot {
            slots: self.inner.clone(),
            tenant: key,
        })
    }

    /// Streams served now.
    pub fn taken(&self) -> usize {
        lock(&self.inner.taken).total
    }

    /// Streams of `tenant` served now.
    pub fn taken_by(&self, tenant: Option<&str>) -> usize {
        let key = tenant.map(str::to_owned);
        lock(&self.inner.taken)
            .by_tenant
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// The gateway's cap.
    pub fn max(&self) -> usize {
        self.inner.max
    }

    /// The per-tenant cap.
    pub fn per_tenant(&self) -> usize {
        self.inner.per_tenant
    }
}

/// A stream's place under the caps; released on drop.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Inner>,
    tenant: Option<String>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut taken = lock(&self.slots.taken);
        taken.total = taken.total.saturating_sub(1);
        if let Some(n) = taken.by_tenant.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                taken.by_tenant.remove(&self.tenant);
            }
        }
        super::metrics::subscribers(taken.total);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Never held across an await, and nothing panics while it is held.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_at_its_cap_is_refused_while_others_still_open() {
        let slots = StreamSlots::new(4, 2);
        let a1 = slots.admit(Some("a")).expect("a's first");
        let _a2 = slots.admit(Some("a")).expect("a's second");
        assert_eq!(
            slots.admit(Some("a")).expect_err("a's third"),
            Refused::Tenant {
                tenant: Some("a".to_owned()),
                max: 2
            }
        );
        let _b1 = slots.admit(Some("b")).expect("b opens");
        let _none = slots.admit(None).expect("a caller without a tenant");
        assert_eq!(
            slots.admit(Some("c")).expect_err("the gateway is full"),
            Refused::Gateway { max: 4 }
        );
        drop(a1);
        assert_eq!(slots.taken_by(Some("a")), 1);
        let _a3 = slots.admit(Some("a")).expect("a place was freed");
        assert_eq!(slots.taken(), 4);
    }

    #[test]
    fn the_map_forgets_a_tenant_with_its_last_stream() {
        let slots = StreamSlots::new(10, 3);
        let held: Vec<Slot> = (0..3)
            .map(|i| slots.admit(Some(&format!("t{i}"))).expect("admitted"))
            .collect();
        assert_eq!(lock(&slots.inner.taken).by_tenant.len(), 3);
        drop(held);
        assert_eq!(slots.taken(), 0);
        assert!(lock(&slots.inner.taken).by_tenant.is_empty());
    }

    #[test]
    fn refusals_are_a_503_for_the_gateway_and_a_429_for_a_tenant() {
        let gateway = ApiError::from(Refused::Gateway { max: 4 });
        assert_eq!(
            gateway.status(),
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        );
        let tenant = ApiError::from(Refused::Tenant {
            tenant: Some("acme".to_owned()),
            max: 2,
        });
        assert_eq!(tenant.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
        let message = tenant.to_string();
        assert!(
            message.contains("acme") && message.contains("max-subscribers-per-tenant"),
            "{message}"
        );
    }
}
