//! Concurrency and rate limits per job type (and per key taken from the payload),
//! cluster-wide on the shared Redis limiters. Concurrency: an attempt takes a lease before
//! it runs and gives it back when it ends (a runner killed mid-attempt leaves a lease that
//! expires after the attempt's timeout plus a margin). Rate: an attempt takes one start of
//! a sliding window (at most `limit` starts in any `per`). A job refused either does not
//! wait in its handler: its `run` is rescheduled (a timed message) after the limiter's
//! retry hint (a lease's capped at [`MAX_WAIT`], since a release cannot be predicted; the
//! window's exact), and its record says why it waits.

use std::time::Duration;

use shoal::redis::RedisClient;
use shoal::redis::limits::{ConcurrencyLimit, Lease, SlidingWindow};

use super::handler::{JobOptions, RateLimit};

/// Longest wait before a refused job asks for a lease again.
pub const MAX_WAIT: Duration = Duration::from_secs(1);
/// How long a lease outlives the attempt's timeout (a dead holder's lease expires then).
pub const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// Whether an attempt may start.
#[derive(Debug)]
pub(crate) enum Gate {
    /// It may; the lease (if the type is limited) is released when it ends.
    Open(Option<Lease>),
    /// Not yet: run again after `after`; `reason` goes into the record.
    Wait { after: Duration, reason: String },
}

/// Admits an attempt of `job_type` under its type's limits: takes the concurrency lease
/// (if limited), then one start of the rate window (if limited; taken last, so a job
/// refused a lease spends none of the rate). Refused, it says how long to wait and why.
pub(crate) async fn admit(
    redis: Option<&RedisClient>,
    job_type: &str,
    options: &JobOptions,
    payload: &serde_json::Value,
    timeout: Duration,
) -> Gate {
    if options.concurrency.is_none() && options.rate.is_none() {
        return Gate::Open(None);
    }
    let Some(redis) = redis else {
        return Gate::Wait {
            after: MAX_WAIT,
            reason: format!("job type `{job_type}` is limited but this runner has no Redis"),
        };
    };
    let key = options
        .limit_key
        .and_then(|key_of| key_of(payload))
        .unwrap_or_else(|| "*".to_owned());
    let lease = match options.concurrency {
        None => None,
        Some(limit) => match lease(redis, job_type, limit, &key, timeout).await {
            Ok(lease) => Some(lease),
            Err(wait) => return wait,
        },
    };
    if let Some(rate) = options.rate
        && let Err(wait) = start(redis, job_type, rate, &key).await
    {
        if let Some(lease) = lease {
            // A failed release expires with the lease TTL.
            let _ = lease.release().await;
        }
        return wait;
    }
    Gate::Open(lease)
}

/// A refused job's wait stretched by its priority: 0 waits the limiter's hint, each step
/// down a quarter more (9: 3.25 ×), so when a slot frees the higher-priority waiters are
/// the likelier to ask first. There is no queue to reorder (each job is its own entity);
/// this biases who asks, it does not rank a strict order.
pub(crate) fn by_priority(wait: Duration, priority: u8) -> Duration {
    wait.mul_f64(1.0 + f64::from(priority.min(9)) * 0.25)
}

async fn lease(
    redis: &RedisClient,
    job_type: &str,
    limit: u32,
    key: &str,
    timeout: Duration,
) -> Result<Lease, Gate> {
    let leases = ConcurrencyLimit::new(
        redis.clone(),
        &format!("job:{job_type}"),
        limit,
        timeout + super::handler::GRACE + LEASE_MARGIN,
    );
    match leases.try_acquire(key).await {
        Ok((_, Some(lease))) => Ok(lease),
        Ok((decision, None)) => Err(Gate::Wait {
            after: shoal::backoff::jittered(decision.retry_after.min(MAX_WAIT)),
            reason: format!("waiting for a slot: {limit} of `{job_type}` (key `{key}`) running"),
        }),
        Err(error) => Err(Gate::Wait {
            after: shoal::backoff::jittered(MAX_WAIT),
            reason: format!("concurrency lease unavailable: {error}"),
        }),
    }
}

async fn start(
    redis: &RedisClient,
    job_type: &str,
    rate: RateLimit,
    key: &str,
) -> Result<(), Gate> {
    let window = SlidingWindow::new(
        redis.clone(),
        &format!("job:{job_type}"),
        rate.limit,
        rate.per,
    );
    match window.check(key).await {
        Ok(decision) if decision.allowed => Ok(()),
        // The window says when a start frees; that is exact, so no cap applies.
        Ok(decision) => Err(Gate::Wait {
            after: shoal::backoff::jittered(decision.retry_after.max(Duration::from_millis(10))),
            reason: format!(
                "rate limited: {} starts of `{job_type}` (key `{key}`) per {:?}",
                rate.limit, rate.per
            ),
        }),
        Err(error) => Err(Gate::Wait {
            after: shoal::backoff::jittered(MAX_WAIT),
            reason: format!("rate limiter unavailable: {error}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_priorities_wait_longer() {
        let hint = Duration::from_millis(400);
        assert_eq!(by_priority(hint, 0), hint);
        assert_eq!(by_priority(hint, 4), Duration::from_millis(800));
        assert_eq!(by_priority(hint, 9), Duration::from_millis(1300));
        assert_eq!(by_priority(hint, 200), Duration::from_millis(1300));
    }
}
