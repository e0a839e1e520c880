//! `counter`: an integer per entity, kept in Postgres.
//!
//! `increment` is persisted; the new count is written in the same epoch-checked transaction
//! that completes the message, so a redelivered message is never counted twice. `get` is
//! volatile and reads the count in memory. From Rust:
//! `client.entity::<Counter>("c1").ask(CounterMessage::Increment { by: 2 })` returns a
//! [`CounterReply`].

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal::entity::{
    Entity, EntityContext, EntityOptions, EntityProtocol, GatewayAccess, HandlerError, TenantScope,
};
use utoipa::ToSchema;

/// The counter entity type.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counter;

/// A counter's messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CounterMessage {
    /// Adds `by` (default 1) and replies with the new count.
    Increment {
        /// Amount to add.
        #[serde(default = "one")]
        by: i64,
    },
    /// Replies with the current count.
    Get {},
}

fn one() -> i64 {
    1
}

/// A counter's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterState {
    /// The count.
    pub count: i64,
}

/// A counter's reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CounterReply {
    /// The count after the message.
    pub count: i64,
}

impl EntityProtocol for Counter {
    const NAME: &'static str = "counter";
    // With auth on, a tenant's counters are those with ids `<tenant>` or `<tenant>:…`.
    const ACCESS: GatewayAccess = GatewayAccess::Public(TenantScope::IdPrefix);
    type Message = CounterMessage;
    type Reply = CounterReply;

    /// A counter idle for a while sleeps as data (a few hundred bytes, no actor), so it
    /// stays resident ten minutes: a returning caller saves the state read.
    fn options(&self) -> EntityOptions {
        EntityOptions {
            max_idle: Duration::from_secs(600),
            ..EntityOptions::default()
        }
    }

    fn is_persisted(message: &CounterMessage) -> bool {
        matches!(message, CounterMessage::Increment { .. })
    }
}

impl Entity for Counter {
    type State = CounterState;
    const PERSIST_STATE: bool = true;

    async fn handle(
        &self,
        _ctx: &EntityContext,
        state: &mut CounterState,
        message: CounterMessage,
    ) -> Result<CounterReply, HandlerError> {
        if let CounterMessage::Increment { by } = message {
            state.count = state.count.checked_add(by).ok_or_else(|| {
                HandlerError::permanent("overflow", "the count would overflow an i64")
            })?;
        }
        Ok(CounterReply { count: state.count })
    }
}
