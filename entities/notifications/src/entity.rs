//! `notification`: one entity per tenant (the entity id is the tenant). It numbers the
//! tenant's events, stores each in the history and pushes it to the gateways.
//!
//! `publish` is persisted (the gateway passes the caller's `Idempotency-Key`, entities
//! theirs). The state is only the last number given, committed with the completion; the
//! history row is inserted before that commit. A publish that runs again after a crash
//! (its completion never committed) reloads the same state, takes the same number and
//! inserts the same row, which is a no-op: the number and the content of an event never
//! change once a reader could have seen them. The push goes out after the insert, so a
//! gateway that receives it can always find the event (and every earlier one) in the
//! history.

use std::sync::Arc;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use shoal::entity::{Entity, EntityContext, EntityOptions, EntityProtocol, HandlerError};
use utoipa::ToSchema;

use super::carrier::Carrier;
use super::history::{Event, History};
use super::{NotificationsConfig, Tenant, Topic};

/// The notification entity type.
#[derive(Debug, Clone)]
pub struct Notification {
    history: Option<History>,
    carrier: Option<Carrier>,
    config: Arc<NotificationsConfig>,
}

impl Notification {
    /// Stores events in `history` (none on a node that only validates) and pushes them
    /// through `carrier` (none: gateways find them by their periodic catch-up).
    pub fn new(
        history: Option<History>,
        carrier: Option<Carrier>,
        config: Arc<NotificationsConfig>,
    ) -> Self {
        Self {
            history,
            carrier,
            config,
        }
    }
}

/// A notification entity's messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum NotificationMessage {
    /// Appends an event to the tenant's stream; replies with its number.
    Publish(NewEvent),
}

/// An event to publish.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEvent {
    /// The topic: 1–64 of `A-Z a-z 0-9 . _ - :`, not `reset` (the SSE `event:` field).
    #[schema(schema_with = topic_schema)]
    pub topic: String,
    /// Any JSON value (the SSE `data:` field).
    pub data: serde_json::Value,
}

fn topic_schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    shoal::gateway::openapi::object_schema(super::Topic::schema())
}

/// What a publish answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Published {
    /// The event's number in its tenant's stream (the SSE `id:`).
    pub seq: u64,
}

/// The state: the last number given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationState {
    /// The last seq given (0 before the first event).
    pub last: u64,
}

impl EntityProtocol for Notification {
    const NAME: &'static str = "notification";
    type Message = NotificationMessage;
    type Reply = Published;

    fn is_persisted(_message: &NotificationMessage) -> bool {
        true
    }

    fn options(&self) -> EntityOptions {
        EntityOptions {
            mailbox_capacity: std::num::NonZeroUsize::new(1024)
                .unwrap_or(std::num::NonZeroUsize::MIN),
            ..EntityOptions::default()
        }
    }
}

impl Entity for Notification {
    type State = NotificationState;
    const PERSIST_STATE: bool = true;

    async fn handle(
        &self,
        ctx: &EntityContext,
        state: &mut NotificationState,
        message: NotificationMessage,
    ) -> Result<Published, HandlerError> {
        let NotificationMessage::Publish(new) = message;
        let tenant: Tenant = ctx
            .address
            .entity_id
            .as_str()
            .parse()
            .map_err(|e: super::BadName| HandlerError::permanent("bad_tenant", e.to_string()))?;
        let topic: Topic = new
            .topic
            .parse()
            .map_err(|e: super::BadName| HandlerError::permanent("bad_topic", e.to_string()))?;
        let history = self.history.as_ref().ok_or_else(|| {
            HandlerError::retryable("no_history", "this node keeps no notification history")
        })?;
        let event = Event {
            tenant: tenant.to_string(),
            seq: state.last + 1,
            topic: topic.to_string(),
            data: new.data,
            published_at: Utc::now(),
        };
        history
            .insert(&event)
            .await
            .map_err(|e| HandlerError::retryable("history_unavailable", e.to_string()))?;
        state.last = event.seq;
        super::metrics::published();
        if event.seq.is_multiple_of(self.config.prune_every)
            && let Err(error) = history
                .prune(&tenant, event.seq, self.config.history_max_events)
                .await
        {
            tracing::warn!(%error, %tenant, "pruning the notification history failed");
        }
        if let Some(carrier) = &self.carrier {
            carrier.push(&event).await;
        }
        Ok(Published { seq: event.seq })
    }
}
