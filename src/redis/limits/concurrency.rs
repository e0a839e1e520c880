//! Concurrency leases: at most N calls in flight per key across every replica. A lease is
//! released on completion; a lease whose holder crashed is reclaimed once its TTL has
//! passed (`lease_acquire.lua` drops expired leases before counting).

use crate::backoff::jittered;
use std::time::{Duration, Instant, SystemTime};

use ::redis::Script;

use super::{Admission, Decision, LimitError, millis};
use crate::redis::{RedisClient, RedisError};

static LEASE_ACQUIRE: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("../lua/lease_acquire.lua")));

/// At most `limit` calls in flight per key, across every replica.
#[derive(Debug, Clone)]
pub struct ConcurrencyLimit {
    client: RedisClient,
    name: String,
    limit: u64,
    lease_ttl: Duration,
}

/// A held slot of a [`ConcurrencyLimit`]. Release it with [`Lease::release`]; if it is
/// dropped unreleased, a release is sent in the background, and if its holder dies it
/// expires after the lease TTL.
#[derive(Debug)]
pub struct Lease {
    client: RedisClient,
    key: String,
    id: String,
    released: bool,
}

impl ConcurrencyLimit {
    /// A limit whose keys live under `<prefix>:cl:<name>:`.
    pub fn new(client: RedisClient, name: &str, limit: u32, lease_ttl: Duration) -> Self {
        Self {
            name: client.key("cl", name),
            client,
            limit: u64::from(limit.max(1)),
            lease_ttl,
        }
    }

    /// Tries once to take a lease for `key`: the decision, and the lease if admitted.
    pub async fn try_acquire(&self, key: &str) -> Result<(Decision, Option<Lease>), RedisError> {
        let key = format!("{}:{key}", self.name);
        let id = uuid::Uuid::now_v7().simple().to_string();
        let decision = self.renew_raw(&key, &id).await?;
        let lease = decision.allowed.then(|| Lease {
            client: self.client.clone(),
            key,
            id,
            released: false,
        });
        Ok((decision, lease))
    }

    async fn renew_raw(&self, key: &str, id: &str) -> Result<Decision, RedisError> {
        let args = [
            self.limit.to_string(),
            millis(self.lease_ttl).to_string(),
            id.to_owned(),
            String::new(),
        ];
        let reply: Vec<i64> = self
            .client
            .script("lease_acquire", &LEASE_ACQUIRE, &[key], &args)
            .await?;
        Decision::from_reply("lease_acquire", self.limit, &reply)
    }

    /// Takes a lease for `key` under `admission`. While waiting it polls at least every
    /// 50 ms, since a release (unlike an expiry) cannot be predicted.
    pub async fn acquire(&self, key: &str, admission: Admission) -> Result<Lease, LimitError> {
        let started = Instant::now();
        loop {
            let (decision, lease) = self.try_acquire(key).await?;
            if let Some(lease) = lease {
                crate::metrics::rate_limit_decision("concurrency", "allowed");
                return Ok(lease);
            }
            crate::metrics::rate_limit_decision("concurrency", "limited");
            let wait = jittered(decision.retry_after.min(Duration::from_millis(50)));
            match admission {
                Admission::Wait { max_wait } if started.elapsed() + wait <= max_wait => {
                    tokio::time::sleep(wait).await;
                }
                _ => {
                    return Err(LimitError::Limited {
                        limiter: "concurrency",
                        decision,
                    });
                }
            }
        }
    }

    /// Unexpired leases of `key` now (for status pages and tests).
    pub async fn in_use(&self, key: &str) -> Result<u64, RedisError> {
        let key = format!("{}:{key}", self.name);
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let mut cmd = ::redis::cmd("ZCOUNT");
        cmd.arg(&key).arg(format!("({now}")).arg("+inf");
        self.client.command("lease_count", &cmd).await
    }
}

impl Lease {
    /// The lease's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Gives the slot back.
    pub async fn release(mut self) -> Result<(), RedisError> {
        self.released = true;
        let mut cmd = ::redis::cmd("ZREM");
        cmd.arg(&self.key).arg(&self.id);
        self.client.command::<i64>("lease_release", &cmd).await?;
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        // Dropped without a release (a cancelled task, an early return): give the slot
        // back in the background; the TTL is the backstop if this cannot run.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            let mut cmd = ::redis::cmd("ZREM");
            cmd.arg(&self.key).arg(&self.id);
            runtime.spawn(async move {
                let _ = client.command::<i64>("lease_release", &cmd).await;
            });
        }
    }
}
