//! A circuit breaker shared by every replica: closed → open after `failure-threshold`
//! failures within `failure-window` → half-open once `reset-timeout` has passed, admitting
//! at most `half-open-max-calls` trial calls → closed when a trial succeeds (open again when
//! one fails).
//!
//! Invariants: the state lives only in Redis and every transition is one Lua script, so all
//! replicas see the same state and two replicas can never both admit the last trial call.
//! The local [`metrics::BREAKER_STATE`](crate::metrics::BREAKER_STATE) gauge is the state
//! this process last saw (updated on every admit, record and read).

use std::time::Duration;

use ::redis::Script;

use super::{RedisClient, RedisError};
use crate::config::BreakerConfig;

static ADMIT: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("lua/breaker_admit.lua")));
static RECORD: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("lua/breaker_record.lua")));
static STATE: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("lua/breaker_state.lua")));

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls pass.
    Closed,
    /// Calls are refused until `retry_after` has passed.
    Open {
        /// Time left before trial calls are admitted.
        retry_after: Duration,
    },
    /// A bounded number of trial calls pass.
    HalfOpen,
}

impl BreakerState {
    fn from_code(code: i64, retry_after_ms: i64) -> Self {
        match code {
            2 => Self::Open {
                retry_after: Duration::from_millis(u64::try_from(retry_after_ms).unwrap_or(0)),
            },
            1 => Self::HalfOpen,
            _ => Self::Closed,
        }
    }

    /// `closed`, `open` or `half_open`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open { .. } => "open",
            Self::HalfOpen => "half_open",
        }
    }

    fn gauge(&self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::HalfOpen => 1.0,
            Self::Open { .. } => 2.0,
        }
    }
}

/// Why a call may not go ahead.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BreakerError {
    /// The breaker is open, or half-open with its trial calls taken.
    #[error("circuit `{name}` is {}; retry after {retry_after:?}", state.name())]
    Open {
        /// The breaker.
        name: String,
        /// Its state.
        state: BreakerState,
        /// When a call may be admitted again.
        retry_after: Duration,
    },
    /// Redis could not decide.
    #[error(transparent)]
    Redis(#[from] RedisError),
}

/// How an admitted call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It worked.
    Success,
    /// It failed in a way that counts against the dependency.
    Failure,
}

/// Permission to make one call; hand it back to [`CircuitBreaker::record`].
#[derive(Debug)]
#[must_use = "record the call's outcome with CircuitBreaker::record"]
pub struct Permit {
    trial: bool,
}

impl Permit {
    /// Whether this is a half-open trial call.
    pub fn is_trial(&self) -> bool {
        self.trial
    }
}

/// One named breaker (e.g. a provider's), shared through Redis.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    client: RedisClient,
    name: String,
    state_key: String,
    failures_key: String,
    config: BreakerConfig,
    /// Whether the state gauge is set (labelled with the name).
    gauge: bool,
}

impl CircuitBreaker {
    /// The breaker `name` with the thresholds of `config`.
    pub fn new(client: RedisClient, name: &str, config: &BreakerConfig) -> Self {
        Self {
            state_key: client.key("breaker", name),
            failures_key: client.key("breaker-failures", name),
            client,
            name: name.to_owned(),
            config: config.clone(),
            gauge: true,
        }
    }

    /// This breaker without its state gauge: for breakers named after input that has no
    /// bound (one metric series per name would grow without end).
    pub fn without_gauge(mut self) -> Self {
        self.gauge = false;
        self
    }

    fn report(&self, state: &BreakerState) {
        if self.gauge {
            crate::metrics::breaker_state(&self.name, state.gauge());
        }
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Asks to make a call: a [`Permit`], or [`BreakerError::Open`].
    pub async fn admit(&self) -> Result<Permit, BreakerError> {
        self.admit_at(None).await
    }

    /// [`CircuitBreaker::admit`] at a given time in ms (tests drive the clock); `None` is
    /// the server's clock.
    pub async fn admit_at(&self, now_ms: Option<i64>) -> Result<Permit, BreakerError> {
        let args = [
            ms(self.config.reset_timeout),
            self.config.half_open_max_calls.to_string(),
            now_ms.map(|n| n.to_string()).unwrap_or_default(),
        ];
        let reply: Vec<i64> = self
            .client
            .script("breaker_admit", &ADMIT, &[&self.state_key], &args)
            .await?;
        let &[admitted, state, retry_after, trial] = reply.as_slice() else {
            return Err(unexpected("breaker_admit", &reply).into());
        };
        let state = BreakerState::from_code(state, retry_after);
        self.report(&state);
        if admitted == 1 {
            return Ok(Permit { trial: trial == 1 });
        }
        Err(BreakerError::Open {
            name: self.name.clone(),
            state,
            retry_after: Duration::from_millis(u64::try_from(retry_after).unwrap_or(0)),
        })
    }

    /// Records how a permitted call ended; returns the state after it.
    pub async fn record(
        &self,
        permit: Permit,
        outcome: Outcome,
    ) -> Result<BreakerState, RedisError> {
        self.record_at(permit, outcome, None).await
    }

    /// [`CircuitBreaker::record`] at a given time in ms; `None` is the server's clock.
    pub async fn record_at(
        &self,
        permit: Permit,
        outcome: Outcome,
        now_ms: Option<i64>,
    ) -> Result<BreakerState, RedisError> {
        let args = [
            match outcome {
                Outcome::Success => "success",
                Outcome::Failure => "failure",
            }
            .to_owned(),
            self.config.failure_threshold.to_string(),
            ms(self.config.failure_window),
            uuid::Uuid::now_v7().simple().to_string(),
            if permit.trial { "1" } else { "0" }.to_owned(),
            now_ms.map(|n| n.to_string()).unwrap_or_default(),
        ];
        let keys = [self.state_key.as_str(), self.failures_key.as_str()];
        let reply: Vec<i64> = self
            .client
            .script("breaker_record", &RECORD, &keys, &args)
            .await?;
        let &[state, changed] = reply.as_slice() else {
            return Err(unexpected("breaker_record", &reply));
        };
        let state = BreakerState::from_code(state, self.config.reset_timeout.as_millis() as i64);
        if changed == 1 {
            tracing::warn!(breaker = %self.name, state = state.name(), "circuit breaker changed state");
        }
        self.report(&state);
        Ok(state)
    }

    /// The state a call would meet now (read only).
    pub async fn state(&self) -> Result<BreakerState, RedisError> {
        let args = [ms(self.config.reset_timeout), String::new()];
        let reply: Vec<i64> = self
            .client
            .script("breaker_state", &STATE, &[&self.state_key], &args)
            .await?;
        let &[state, retry_after] = reply.as_slice() else {
            return Err(unexpected("breaker_state", &reply));
        };
        let state = BreakerState::from_code(state, retry_after);
        self.report(&state);
        Ok(state)
    }

    /// Runs `call` under the breaker: refused while open, its outcome recorded (an `Err`
    /// counts as a failure). A failure to record is logged, never hides the call's result.
    pub async fn call<T, E, Fut>(
        &self,
        call: impl FnOnce() -> Fut,
    ) -> Result<Result<T, E>, BreakerError>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        let permit = self.admit().await?;
        let result = call().await;
        let outcome = if result.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        if let Err(error) = self.record(permit, outcome).await {
            tracing::warn!(breaker = %self.name, %error, "could not record a call's outcome");
        }
        Ok(result)
    }
}

fn ms(duration: Duration) -> String {
    duration.as_millis().max(1).to_string()
}

fn unexpected(op: &'static str, reply: &[i64]) -> RedisError {
    RedisError::Reply {
        op,
        message: format!("unexpected reply {reply:?}"),
    }
}
