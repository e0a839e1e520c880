//! `probe`: a diagnostic entity for drills and tests.
//!
//! - `echo {value}` (volatile): replies with `value`.
//! - `sleep {ms}` (volatile): holds the entity for `ms` milliseconds (fills mailboxes).
//! - `record {value}` (persisted): appends `value` to the entity's state, replies with the
//!   list so far (shows persisted ordering).
//! - `record_slowly {value, ms}` (persisted): holds the entity for `ms` milliseconds, then
//!   records `value` (a long persisted handler: drains, shutdowns).
//! - `fail_until {attempts}` (persisted): panics while the message has had fewer than
//!   `attempts` earlier delivery attempts, then succeeds (shows restart and replay).
//! - `unstorable {part}` (persisted): produces a reply (`part = "reply"`) or a state
//!   (`"state"`) holding a NUL character, which storage cannot hold (shows that such a
//!   message is completed once with the error reply `unstorable_reply`). The gateway
//!   refuses NUL in a persisted body, so the handler makes it itself.
//! - `forward {to, value, hold_ms}` (persisted): records `{value, by}` (`by` the handling
//!   runner) and sends `record` of the same to probe `to`, then holds the entity `hold_ms`
//!   (default 0) before completing. The send rides on the completion (the outbox): the
//!   other probe gets it exactly when this state change commits.
//! - `remind {after_ms, value}` (persisted): schedules `record {value}` to itself `after_ms`
//!   milliseconds from now (a durable timer).
//! - `enqueue_noop {fail_first}` (persisted): enqueues a `diag.noop` job through its context
//!   and replies `{job}`; with `fail_first`, the first delivery panics after enqueueing (shows
//!   that a replayed handler names the same job: the derived key).

use std::num::NonZeroUsize;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal::entity::{
    Entity, EntityContext, EntityOptions, EntityProtocol, GatewayAccess, HandlerError, TenantScope,
};
use utoipa::ToSchema;

/// The probe entity type.
#[derive(Debug, Clone, Copy, Default)]
pub struct Probe;

/// A probe's messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ProbeMessage {
    /// Replies with `value`.
    Echo {
        /// Anything.
        value: serde_json::Value,
    },
    /// Holds the entity for `ms` milliseconds.
    Sleep {
        /// Milliseconds, at most 60000.
        ms: u64,
    },
    /// Appends `value` to the state.
    Record {
        /// Anything.
        value: serde_json::Value,
    },
    /// Holds the entity for `ms` milliseconds, then appends `value` to the state.
    RecordSlowly {
        /// Anything.
        value: serde_json::Value,
        /// Milliseconds, at most 60000.
        ms: u64,
    },
    /// Panics until the message has been attempted `attempts` times.
    FailUntil {
        /// Earlier attempts needed before success.
        attempts: i32,
    },
    /// Produces a reply or a state storage cannot hold.
    Unstorable {
        /// Which of the two holds the NUL character.
        part: UnstorablePart,
    },
    /// Records `{value, by}` and sends `record` of it to probe `to`.
    Forward {
        /// The probe that records it too.
        to: String,
        /// Anything.
        value: serde_json::Value,
        /// Milliseconds to hold the entity after sending, at most 60000.
        #[serde(default)]
        hold_ms: u64,
    },
    /// Enqueues a `diag.noop` job; replies `{job}`.
    EnqueueNoop {
        /// Panic on the first delivery, after enqueueing.
        #[serde(default)]
        fail_first: bool,
    },
    /// Schedules `record {value}` to itself `after_ms` from now.
    Remind {
        /// Milliseconds until the record is due.
        after_ms: u64,
        /// Anything.
        value: serde_json::Value,
    },
}

/// Where [`ProbeMessage::Unstorable`] puts its NUL character.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UnstorablePart {
    /// The reply.
    Reply,
    /// The entity's state.
    State,
}

/// A probe's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeState {
    /// Values recorded, in handling order.
    pub recorded: Vec<serde_json::Value>,
}

impl EntityProtocol for Probe {
    const NAME: &'static str = "probe";
    // With auth on, a tenant's probes are those with ids `<tenant>` or `<tenant>:…`.
    const ACCESS: GatewayAccess = GatewayAccess::Public(TenantScope::IdPrefix);
    type Message = ProbeMessage;
    type Reply = serde_json::Value;

    fn options(&self) -> EntityOptions {
        EntityOptions {
            mailbox_capacity: NonZeroUsize::new(4).unwrap_or(NonZeroUsize::MIN),
            ..EntityOptions::default()
        }
    }

    fn is_persisted(message: &ProbeMessage) -> bool {
        !matches!(
            message,
            ProbeMessage::Echo { .. } | ProbeMessage::Sleep { .. }
        )
    }
}

impl Entity for Probe {
    type State = ProbeState;
    const PERSIST_STATE: bool = true;

    async fn handle(
        &self,
        ctx: &EntityContext,
        state: &mut ProbeState,
        message: ProbeMessage,
    ) -> Result<serde_json::Value, HandlerError> {
        match message {
            ProbeMessage::Echo { value } => Ok(value),
            ProbeMessage::Sleep { ms } => {
                tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
                Ok(serde_json::json!({ "slept_ms": ms }))
            }
            ProbeMessage::Record { value } => {
                state.recorded.push(value);
                Ok(serde_json::json!({ "recorded": state.recorded }))
            }
            ProbeMessage::RecordSlowly { value, ms } => {
                tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
                state.recorded.push(value);
                Ok(serde_json::json!({ "recorded": state.recorded }))
            }
            ProbeMessage::FailUntil { attempts } => {
                if ctx.attempts < attempts {
                    panic!("probe failing on attempt {} of {attempts}", ctx.attempts);
                }
                Ok(serde_json::json!({ "succeeded_on_attempt": ctx.attempts }))
            }
            ProbeMessage::Unstorable {
                part: UnstorablePart::Reply,
            } => Ok(serde_json::json!({ "text": "before\u{0}after" })),
            ProbeMessage::Unstorable {
                part: UnstorablePart::State,
            } => {
                state.recorded.push(serde_json::json!("before\u{0}after"));
                Ok(serde_json::json!({ "recorded": state.recorded.len() }))
            }
            ProbeMessage::Forward { to, value, hold_ms } => {
                let entry = serde_json::json!({ "value": value, "by": ctx.runner_id });
                let record = ProbeMessage::Record {
                    value: entry.clone(),
                };
                ctx.entity::<Probe>(to.as_str()).send(record).await?;
                state.recorded.push(entry);
                tokio::time::sleep(Duration::from_millis(hold_ms.min(60_000))).await;
                Ok(serde_json::json!({ "recorded": state.recorded.len() }))
            }
            ProbeMessage::EnqueueNoop { fail_first } => {
                let request = shoal_jobs::JobRequest::of::<shoal_jobs::diagnostic::Noop>(
                    &Default::default(),
                )?;
                let job = shoal_jobs::enqueue(ctx, request).await?;
                if fail_first && ctx.attempts == 0 {
                    panic!("probe failing after enqueueing {}", job.id);
                }
                Ok(serde_json::json!({ "job": job.id }))
            }
            ProbeMessage::Remind { after_ms, value } => {
                let id = ctx
                    .entity::<Probe>(ctx.address.entity_id.clone())
                    .after(Duration::from_millis(after_ms))
                    .send(ProbeMessage::Record { value })
                    .await?;
                Ok(serde_json::json!({ "scheduled": id }))
            }
        }
    }
}
