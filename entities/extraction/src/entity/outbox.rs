//! What the handler sends out with a completion: the next `advance` (sent at once, or a
//! timed message) and each step on the requesting tenant's notification stream. Both go
//! through the handler's context, so they ride on the completion (the outbox) and happen
//! once, when it commits.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use shoal::client::Request;
use shoal::entity::{EntityContext, HandlerError};
use shoal_notifications::entity::{NewEvent, Notification, NotificationMessage};

use super::state::ExtractionState;
use crate::model::Stage;

/// Publishes an event of the extraction on the requesting tenant's notification stream
/// (topic `extraction`, data `{id, kind, …}`), if the first request named a tenant: a
/// send through the handler's context, so it rides on the completion (the outbox) and the
/// stream shows each step once, when it committed. A send that cannot be made is logged;
/// it never fails the extraction. The result itself stays at `GET /extractions/{id}`
/// (`complete` carries only its counts).
pub(super) async fn publish(
    ctx: &EntityContext,
    state: &ExtractionState,
    kind: &str,
    mut data: Value,
) {
    let Some(tenant) = state.request.as_ref().and_then(|r| r.tenant.as_deref()) else {
        return;
    };
    if let Value::Object(fields) = &mut data {
        fields.insert("id".to_owned(), json!(state.id));
        fields.insert("kind".to_owned(), json!(kind));
    }
    let event = NewEvent {
        topic: EXTRACTION_TOPIC.to_owned(),
        data,
    };
    let sent = ctx
        .entity::<Notification>(tenant)
        .send(NotificationMessage::Publish(event))
        .await;
    if let Err(error) = sent {
        tracing::warn!(extraction = %state.id, %tenant, %error, "could not publish the extraction's step");
    }
}

/// The topic of extraction steps on a tenant's stream.
pub const EXTRACTION_TOPIC: &str = "extraction";

/// Schedules `advance {stage, attempt}` for `at` (in the completion's outbox either way).
pub(super) async fn schedule_advance(
    ctx: &EntityContext,
    state: &ExtractionState,
    stage: Stage,
    attempt: u32,
    at: DateTime<Utc>,
) -> Result<(), HandlerError> {
    let body = json!({"stage": stage, "generation": state.generation, "attempt": attempt});
    let request = Request::persisted(ctx.address.clone(), "advance", body);
    // Due now: sent (pushed to the owner right after the commit); later: a timed message.
    let sent = if at <= Utc::now() {
        ctx.send(request).await
    } else {
        ctx.schedule(request, at).await
    };
    sent.map_err(|e| HandlerError::retryable("schedule_failed", e.to_string()))?;
    Ok(())
}
