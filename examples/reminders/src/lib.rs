//! Reminders: a small application on Shoal that uses the job system as a library.
//!
//! It has one entity type of its own, `reminder`, and takes `shoal-jobs` for the work it
//! defers: setting a reminder enqueues a `reminder.deliver` job to run when it is due,
//! keyed so that a replayed `set` never enqueues twice; reading it asks the job how it went.
//! Its HTTP routes are served by the gateway beside the gateway's own:
//!
//! - `PUT /reminders/{id}` `{"text": "…", "after_ms": 500}`: sets the reminder.
//! - `GET /reminders/{id}`: the reminder and its delivery's status and result.
//!
//! [`registry`] and [`routes`] are all a binary needs (see `main.rs`).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use shoal::entity::{Entity, EntityContext, EntityProtocol, EntityRegistry, HandlerError};
use shoal::gateway::{ApiError, AppRouter, ErrorBody, GatewayContext, JsonBody};
use shoal_jobs::entity::{Job, JobMessage};
use shoal_jobs::record::JobView;
use shoal_jobs::{JobContext, JobError, JobHandler, JobRegistry, JobRequest};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The `reminder` entity type: one reminder per id, its state kept in Postgres.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reminder;

/// A reminder's messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ReminderMessage {
    /// Sets the reminder (once: a second `set` is refused) and enqueues its delivery.
    Set(NewReminder),
    /// The reminder, with its delivery as the job system knows it.
    Get {},
}

/// What a reminder says and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewReminder {
    /// The text to deliver (1–500 characters).
    pub text: String,
    /// How long from now it is due, in milliseconds (at most a day).
    #[serde(default)]
    pub after_ms: u64,
}

/// A reminder's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReminderState {
    /// What it says (empty until set).
    pub text: String,
    /// The delivery job.
    pub job: Option<String>,
}

/// A reminder as read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReminderView {
    /// What it says.
    pub text: String,
    /// The delivery job's id.
    pub job: Option<String>,
    /// The delivery's status (`scheduled`, `running`, `succeeded`, …).
    pub status: Option<String>,
    /// What the delivery produced.
    #[schema(value_type = Object)]
    pub delivered: Option<serde_json::Value>,
}

/// The longest text.
const MAX_TEXT: usize = 500;
/// The furthest a reminder may be set ahead.
const MAX_AFTER: Duration = Duration::from_secs(86_400);

impl EntityProtocol for Reminder {
    const NAME: &'static str = "reminder";
    type Message = ReminderMessage;
    type Reply = ReminderView;

    fn is_persisted(message: &ReminderMessage) -> bool {
        matches!(message, ReminderMessage::Set(_))
    }
}

impl Entity for Reminder {
    type State = ReminderState;
    const PERSIST_STATE: bool = true;

    async fn handle(
        &self,
        ctx: &EntityContext,
        state: &mut ReminderState,
        message: ReminderMessage,
    ) -> Result<ReminderView, HandlerError> {
        match message {
            ReminderMessage::Set(new) => {
                if state.job.is_some() {
                    return Err(HandlerError::permanent(
                        "already_set",
                        "this reminder is set already",
                    ));
                }
                let due = chrono::Utc::now()
                    + chrono::Duration::milliseconds(i64::try_from(new.after_ms).unwrap_or(0));
                let payload = Delivery {
                    reminder: ctx.address.entity_id.to_string(),
                    text: new.text.clone(),
                };
                // The key makes a replayed `set` find the job it enqueued the first time.
                let request = JobRequest::of::<DeliverReminder>(&payload)?
                    .key(format!("reminder:{}", ctx.address.entity_id))
                    .run_at(due);
                let enqueued = shoal_jobs::enqueue(ctx, request).await?;
                state.text = new.text;
                state.job = Some(enqueued.id);
                Ok(view(state, None))
            }
            ReminderMessage::Get {} => {
                let job = match &state.job {
                    Some(id) => Some(
                        ctx.entity::<Job>(id.as_str())
                            .ask(JobMessage::Get {})
                            .await?,
                    ),
                    None => None,
                };
                Ok(view(state, job.as_ref()))
            }
        }
    }
}

fn view(state: &ReminderState, job: Option<&JobView>) -> ReminderView {
    ReminderView {
        text: state.text.clone(),
        job: state.job.clone(),
        status: job
            .and_then(|job| serde_json::to_value(job.status).ok())
            .and_then(|status| status.as_str().map(str::to_owned)),
        delivered: job.and_then(|job| job.result.clone()),
    }
}

/// The `reminder.deliver` job type: renders the reminder (a real application would send
/// it somewhere; its output is the job's stored result).
#[derive(Debug, Clone, Copy, Default)]
pub struct DeliverReminder;

/// A delivery's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The reminder's id.
    pub reminder: String,
    /// What it says.
    pub text: String,
}

impl JobHandler for DeliverReminder {
    const TYPE: &'static str = "reminder.deliver";
    type Payload = Delivery;
    type Output = serde_json::Value;

    async fn run(&self, ctx: &JobContext, payload: Delivery) -> Result<Self::Output, JobError> {
        Ok(serde_json::json!({
            "message": format!("Reminder {}: {}", payload.reminder, payload.text),
            "attempt": ctx.attempt(),
        }))
    }
}

/// The application's entity types: `reminder` and the job system with its one job type.
pub fn registry(redis: Option<shoal::redis::RedisClient>) -> anyhow::Result<EntityRegistry> {
    let mut types = JobRegistry::new();
    types.register(DeliverReminder)?;
    let mut registry = EntityRegistry::new();
    registry.register(Reminder)?;
    shoal_jobs::register(&mut registry, Arc::new(types), redis)?;
    Ok(registry)
}

/// The application's routes.
pub fn routes() -> AppRouter {
    OpenApiRouter::new().routes(routes!(set_reminder, get_reminder))
}

/// Sets a reminder.
#[utoipa::path(
    put,
    path = "/reminders/{id}",
    params(("id" = String, Path, description = "The reminder's id")),
    request_body = NewReminder,
    responses(
        (status = 200, description = "Set", body = ReminderView),
        (status = 400, description = "Bad id or body", body = ErrorBody),
        (status = 422, description = "Set already", body = ErrorBody),
        (status = 503, description = "The owner or storage is unavailable", body = ErrorBody),
    ),
    tag = "reminders"
)]
async fn set_reminder(
    State(gateway): State<GatewayContext>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(new): JsonBody<NewReminder>,
) -> Result<Json<ReminderView>, ApiError> {
    let Path(id) = path?;
    let length = new.text.chars().count();
    if length == 0 || length > MAX_TEXT {
        return Err(ApiError::bad_request(
            "bad_text",
            format!("`text` must have 1 to {MAX_TEXT} characters"),
        ));
    }
    if Duration::from_millis(new.after_ms) > MAX_AFTER {
        return Err(ApiError::bad_request(
            "bad_after",
            "`after_ms` must be at most a day (86400000)",
        ));
    }
    let reminder = gateway.client().entity::<Reminder>(id.as_str());
    Ok(Json(reminder.ask(ReminderMessage::Set(new)).await?))
}

/// Reads a reminder.
#[utoipa::path(
    get,
    path = "/reminders/{id}",
    params(("id" = String, Path, description = "The reminder's id")),
    responses(
        (status = 200, description = "The reminder", body = ReminderView),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 503, description = "The owner or storage is unavailable", body = ErrorBody),
    ),
    tag = "reminders"
)]
async fn get_reminder(
    State(gateway): State<GatewayContext>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<ReminderView>, ApiError> {
    let Path(id) = path?;
    let reminder = gateway.client().entity::<Reminder>(id.as_str());
    Ok(Json(reminder.ask(ReminderMessage::Get {}).await?))
}
