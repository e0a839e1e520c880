//! `counter`: an integer per entity, kept in Postgres.
//!
//! `increment` is persisted; the new count is written in the same epoch-checked transaction
//! that completes the message, so a redelivered message is never counted twice. `get` is
//! volatile and reads the count in memory.

use serde::{Deserialize, Serialize};
use shoal::entity::{Entity, EntityContext, EntityOptions, HandlerError};
use shoal::ids::EntityType;
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

impl Entity for Counter {
    type Message = CounterMessage;
    type Reply = CounterReply;
    type State = CounterState;

    fn entity_type(&self) -> EntityType {
        // A constant, valid name.
        EntityType::new("counter").expect("`counter` is a valid entity type name")
    }

    fn options(&self) -> EntityOptions {
        EntityOptions {
            persist_state: true,
            ..EntityOptions::default()
        }
    }

    fn is_persisted(&self, message: &CounterMessage) -> bool {
        matches!(message, CounterMessage::Increment { .. })
    }

    async fn handle(
        &self,
        _ctx: &EntityContext,
        state: &mut CounterState,
        message: CounterMessage,
    ) -> Result<CounterReply, HandlerError> {
        match message {
            CounterMessage::Increment { by } => {
                state.count = state.count.checked_add(by).ok_or_else(|| {
                    HandlerError::permanent("overflow", "the count would overflow an i64")
                })?;
            }
            CounterMessage::Get {} => {}
        }
        Ok(CounterReply { count: state.count })
    }
}
