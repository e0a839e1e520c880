//! What every provider call passes, cluster-wide, on the runtime's Redis limiters
//! (`[redis.providers.<name>]`) and the provider's shared breaker (`[redis.breaker]`):
//!
//! 1. the breaker's state (read only): open → [`GateRefusal::Open`], so an outage pauses
//!    the provider's calls everywhere without spending a window's requests;
//! 2. a concurrency lease, one request of the minute's fixed window and the call's
//!    estimated tokens from the token bucket (`ProviderLimits::acquire`, refusing at once:
//!    the stage waits on a timer, never in a handler) → [`GateRefusal::Limited`];
//! 3. the breaker's permit (half-open admits its trial calls only).
//!
//! After the call, [`ProviderGate::finish`] releases the lease, corrects the bucket by the
//! usage the provider reported, and records the outcome with the breaker (429, 5xx,
//! timeouts and connection errors count against it).

use std::time::Duration;

use shoal::redis::breaker::{BreakerError, BreakerState, CircuitBreaker, Outcome, Permit};
use shoal::redis::limits::{Admission, Lease, LimitError, ProviderLimits};

use super::{ProviderError, Reply};

/// Why a call may not go ahead now.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GateRefusal {
    /// A limit is reached; try after `retry_after`.
    #[error("provider limit `{limiter}` reached; retry after {retry_after:?}")]
    Limited {
        /// Which limit.
        limiter: String,
        /// When to try again.
        retry_after: Duration,
    },
    /// The provider's breaker is open.
    #[error("provider `{provider}` is unavailable (circuit open); retry after {retry_after:?}")]
    Open {
        /// The provider.
        provider: String,
        /// When the breaker admits a trial.
        retry_after: Duration,
    },
    /// The call could never pass (its estimate is over the bucket).
    #[error("{0}")]
    TooLarge(String),
    /// Redis could not decide (fail-fast: no call without the shared limits).
    #[error("redis unavailable for provider limits: {0}")]
    Redis(String),
}

/// A call let through: hand it back to [`ProviderGate::finish`].
#[derive(Debug)]
pub struct Admitted {
    lease: Option<Lease>,
    permit: Option<Permit>,
    estimate: u64,
}

/// A provider's limits and breaker (both absent for the built-in extractor, or without
/// Redis).
#[derive(Debug, Clone)]
pub struct ProviderGate {
    provider: String,
    limits: Option<ProviderLimits>,
    breaker: Option<CircuitBreaker>,
}

impl ProviderGate {
    /// The gate of `provider`.
    pub fn new(
        provider: &str,
        limits: Option<ProviderLimits>,
        breaker: Option<CircuitBreaker>,
    ) -> Self {
        Self {
            provider: provider.to_owned(),
            limits,
            breaker,
        }
    }

    /// A gate that admits everything (the built-in extractor).
    pub fn open(provider: &str) -> Self {
        Self::new(provider, None, None)
    }

    /// Admits one call estimated at `estimate` tokens, or says why not.
    pub async fn admit(&self, estimate: u64) -> Result<Admitted, GateRefusal> {
        if let Some(breaker) = &self.breaker {
            let state = breaker
                .state()
                .await
                .map_err(|e| GateRefusal::Redis(e.to_string()))?;
            if let BreakerState::Open { retry_after } = state {
                return Err(self.open_refusal(retry_after));
            }
        }
        let lease = match &self.limits {
            Some(limits) => Some(
                limits
                    .acquire(estimate, Admission::Refuse)
                    .await
                    .map_err(limit_refusal)?,
            ),
            None => None,
        };
        let permit = match &self.breaker {
            Some(breaker) => match breaker.admit().await {
                Ok(permit) => Some(permit),
                Err(error) => {
                    if let Some(lease) = lease {
                        let _ = lease.release().await;
                    }
                    return Err(match error {
                        BreakerError::Open { retry_after, .. } => self.open_refusal(retry_after),
                        BreakerError::Redis(e) => GateRefusal::Redis(e.to_string()),
                    });
                }
            },
            None => None,
        };
        Ok(Admitted {
            lease,
            permit,
            estimate,
        })
    }

    fn open_refusal(&self, retry_after: Duration) -> GateRefusal {
        GateRefusal::Open {
            provider: self.provider.clone(),
            retry_after: retry_after.max(Duration::from_millis(50)),
        }
    }

    /// Ends an admitted call: releases its lease, corrects the tokens, records the
    /// breaker's outcome. Failures here are logged: the call's result stands.
    pub async fn finish(&self, admitted: Admitted, result: &Result<Reply, ProviderError>) {
        if let Some(lease) = admitted.lease {
            // A lease that fails to release expires with its TTL.
            let _ = lease.release().await;
        }
        if let (Some(limits), Ok(reply)) = (&self.limits, result) {
            let used = reply.usage.input_tokens + reply.usage.output_tokens;
            if used > 0
                && let Err(error) = limits.correct_tokens(admitted.estimate, used).await
            {
                tracing::warn!(provider = %self.provider, %error, "could not correct the token bucket");
            }
        }
        if let (Some(breaker), Some(permit)) = (&self.breaker, admitted.permit) {
            let outcome = match result {
                Err(error) if error.counts_against_provider() => Outcome::Failure,
                _ => Outcome::Success,
            };
            if let Err(error) = breaker.record(permit, outcome).await {
                tracing::warn!(provider = %self.provider, %error, "could not record a call's outcome");
            }
        }
    }
}

fn limit_refusal(error: LimitError) -> GateRefusal {
    match error {
        LimitError::Limited { limiter, decision } => GateRefusal::Limited {
            limiter: limiter.to_owned(),
            retry_after: decision.retry_after.max(Duration::from_millis(10)),
        },
        LimitError::CostTooHigh { cost, limit } => GateRefusal::TooLarge(format!(
            "a call estimated at {cost} tokens exceeds the provider's {limit} tokens/min"
        )),
        LimitError::Redis(e) => GateRefusal::Redis(e.to_string()),
    }
}
