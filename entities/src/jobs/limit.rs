//! Concurrency limits per job type (and per key taken from the payload), cluster-wide on
//! the shared Redis concurrency leases: an attempt takes a lease before it runs and gives
//! it back when it ends (a runner killed mid-attempt leaves a lease that expires after the
//! attempt's timeout plus a margin). A job refused a lease does not wait in its handler:
//! its `run` is rescheduled (a timed message) after the lease's retry hint, capped at
//! [`MAX_WAIT`] since a release cannot be predicted, and its record says why it waits.

use std::time::Duration;

use shoal::redis::RedisClient;
use shoal::redis::limits::{ConcurrencyLimit, Lease};

use super::handler::JobOptions;

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

/// Takes the lease an attempt of `job_type` needs, if its type is limited.
pub(crate) async fn admit(
    redis: Option<&RedisClient>,
    job_type: &str,
    options: &JobOptions,
    payload: &serde_json::Value,
    timeout: Duration,
) -> Gate {
    let Some(limit) = options.concurrency else {
        return Gate::Open(None);
    };
    let Some(redis) = redis else {
        return Gate::Wait {
            after: MAX_WAIT,
            reason: format!("job type `{job_type}` is limited but this runner has no Redis"),
        };
    };
    let key = options
        .concurrency_key
        .and_then(|key_of| key_of(payload))
        .unwrap_or_else(|| "*".to_owned());
    let leases = ConcurrencyLimit::new(
        redis.clone(),
        &format!("job:{job_type}"),
        limit,
        timeout + super::attempt::GRACE + LEASE_MARGIN,
    );
    match leases.try_acquire(&key).await {
        Ok((_, Some(lease))) => Gate::Open(Some(lease)),
        Ok((decision, None)) => Gate::Wait {
            after: shoal::backoff::jittered(decision.retry_after.min(MAX_WAIT)),
            reason: format!("waiting for a slot: {limit} of `{job_type}` (key `{key}`) running"),
        },
        Err(error) => Gate::Wait {
            after: shoal::backoff::jittered(MAX_WAIT),
            reason: format!("concurrency lease unavailable: {error}"),
        },
    }
}
