//! The `extraction` entity: one per content address ([`ExtractionId`]), its state the
//! [`ExtractionState`], kept in Postgres with every completion.
//!
//! - `start` (persisted) records the request and sends `advance {preprocess}` to itself;
//!   a `start` for an extraction that exists already is a **dedup hit**: it attaches to
//!   the run (or the finished result) and changes nothing.
//! - `advance {stage, generation, attempt}` (persisted) runs one stage. A stage whose
//!   checkpoint is in the journal is not run again (after a failover the entity resumes at
//!   the first unfinished stage, never calling the provider for a finished one); otherwise
//!   it runs, its output is appended to the journal as the checkpoint, and the next
//!   `advance` goes out in the completion's outbox. A retryable failure schedules the same
//!   stage after a backoff (a timed message) within the stage's attempt budget; a refusal
//!   by a provider limit or an open breaker schedules it after the wait without spending
//!   an attempt (`waiting`, status `provider_unavailable` while the breaker is open).
//! - `forget {generation}` (scheduled `keep-handle` after the end) empties the state: the
//!   dedup handle is released, the result stays in the result store and cache.
//! - `get` (volatile) reads the state.
//!
//! This file holds the entity type and its handler (the transitions above);
//! `entity/state.rs` the state and the messages; `entity/runner.rs` what a stage runs with
//! ([`Pipeline`]) and how one runs; `entity/outbox.rs` what a completion sends (the next
//! `advance`, the steps on the tenant's stream).

mod outbox;
mod runner;
mod state;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};
use shoal::client::Request;
use shoal::entity::{Entity, EntityContext, EntityOptions, EntityProtocol, HandlerError};
use tracing::Instrument;

use super::journal::Journal;
use super::metrics;
use super::model::{
    ExtractionFailure, ExtractionId, ExtractionRequest, ExtractionResult, FailureKind, Stage,
};
use super::provider::ProviderError;
use outbox::{publish, schedule_advance};
use runner::{StageFailure, stage_key};
use state::{forget, run_of};

pub use outbox::EXTRACTION_TOPIC;
pub use runner::{Pipeline, ProviderSlot};
pub use state::{ExtractionMessage, ExtractionState, ExtractionStatus, StageRun};

/// The extraction entity type.
#[derive(Debug, Clone)]
pub struct Extraction {
    pipeline: Arc<Pipeline>,
}

impl Extraction {
    /// The entity type over `pipeline`.
    pub fn new(pipeline: Arc<Pipeline>) -> Self {
        Self { pipeline }
    }
}

impl EntityProtocol for Extraction {
    const NAME: &'static str = "extraction";
    type Message = ExtractionMessage;
    type Reply = ExtractionState;

    fn is_persisted(message: &ExtractionMessage) -> bool {
        !matches!(message, ExtractionMessage::Get {})
    }

    fn options(&self) -> EntityOptions {
        EntityOptions {
            max_idle: Duration::from_secs(60),
            ..EntityOptions::default()
        }
    }
}

impl Entity for Extraction {
    type State = ExtractionState;
    const PERSIST_STATE: bool = true;

    async fn handle(
        &self,
        ctx: &EntityContext,
        state: &mut ExtractionState,
        message: ExtractionMessage,
    ) -> Result<ExtractionState, HandlerError> {
        let span = tracing::info_span!(
            "extraction",
            id = %ctx.address.entity_id,
            stage = tracing::field::Empty,
            shard = %ctx.shard,
            runner = ?ctx.runner_id,
        );
        async {
            match message {
                ExtractionMessage::Start(request) => self.start(ctx, state, request).await?,
                ExtractionMessage::Advance {
                    stage,
                    generation,
                    attempt,
                } => {
                    tracing::Span::current().record("stage", stage.name());
                    self.advance(ctx, state, stage, generation, attempt).await?
                }
                ExtractionMessage::Forget { generation } => forget(state, generation),
                ExtractionMessage::Get {} => {}
            }
            Ok(state.clone())
        }
        .instrument(span)
        .await
    }
}

fn storage(error: impl std::fmt::Display) -> HandlerError {
    HandlerError::retryable("storage", error.to_string())
}

impl Extraction {
    fn journal(&self) -> Result<&Journal, HandlerError> {
        self.pipeline
            .journal
            .as_ref()
            .ok_or_else(|| HandlerError::retryable("no_journal", "this node has no database"))
    }

    async fn start(
        &self,
        ctx: &EntityContext,
        state: &mut ExtractionState,
        request: ExtractionRequest,
    ) -> Result<(), HandlerError> {
        let id = ctx.address.entity_id.to_string();
        if request.id().as_str() != id {
            return Err(HandlerError::permanent(
                "bad_id",
                format!(
                    "the request's content address is {}, not {id}",
                    request.id()
                ),
            ));
        }
        if state.status != ExtractionStatus::New {
            state.dedup_hits += 1;
            metrics::request("dedup");
            return Ok(());
        }
        metrics::request("new");
        let now = Utc::now();
        let generation = state.generation + 1;
        let data = json!({
            "id": id,
            "ontology_id": request.ontology_id,
            "ontology_version": request.ontology_version,
            "provider": request.provider,
            "model": request.model,
        });
        self.journal()?
            .append_started(
                &id,
                &format!("g{generation}:started"),
                &data,
                request.tenant.as_deref(),
            )
            .await
            .map_err(storage)?;
        *state = ExtractionState {
            id,
            status: ExtractionStatus::Running,
            generation,
            request: Some(request),
            stage: Some(Stage::Preprocess),
            created_at: Some(now),
            updated_at: Some(now),
            ..ExtractionState::default()
        };
        metrics::extraction("started");
        publish(ctx, state, "started", data).await;
        schedule_advance(ctx, state, Stage::Preprocess, 1, now).await
    }

    async fn advance(
        &self,
        ctx: &EntityContext,
        state: &mut ExtractionState,
        stage: Stage,
        generation: u32,
        attempt: u32,
    ) -> Result<(), HandlerError> {
        let current = state.stages.iter().find(|r| r.stage == stage);
        let expected = current.map_or(1, |r| r.failed_attempts + r.invalid_outputs + 1);
        if state.status.is_finished()
            || generation != state.generation
            || state.stage != Some(stage)
            || attempt != expected
        {
            return Ok(()); // stale: an earlier schedule
        }
        let now = Utc::now();
        if current.is_none() {
            state.stages.push(StageRun {
                stage,
                failed_attempts: 0,
                invalid_outputs: 0,
                provider_calls: 0,
                limit_wait_ms: 0,
                chunks_reused: 0,
                started_at: now,
                finished_at: None,
                duration_ms: None,
                from_checkpoint: false,
                last_error: None,
            });
        }
        state.updated_at = Some(now);
        let id = state.id.clone();
        let key = stage_key(generation, stage);
        let journal = self.journal()?.clone();
        if let Some(checkpoint) = journal.checkpoint(&id, &key).await.map_err(storage)? {
            run_of(state, stage).from_checkpoint = true;
            return self.stage_done(ctx, state, stage, checkpoint, false).await;
        }
        match self.pipeline.execute(state, stage).await {
            Ok(output) => {
                let data = json!({"stage": stage.name(), "percent": stage.percent()});
                let stored = journal
                    .append(&id, &key, "progress", &data, Some(&output))
                    .await
                    .map_err(storage)?
                    .unwrap_or(output);
                self.stage_done(ctx, state, stage, stored, true).await
            }
            Err(failure) => self.stage_failed(ctx, state, stage, failure).await,
        }
    }

    /// Records a finished stage and moves on (the next stage, or the end).
    async fn stage_done(
        &self,
        ctx: &EntityContext,
        state: &mut ExtractionState,
        stage: Stage,
        output: Value,
        ran: bool,
    ) -> Result<(), HandlerError> {
        let now = Utc::now();
        let run = run_of(state, stage);
        // (A checkpoint adopted after a crash may have rows its lost state never counted.)
        let chunked = matches!(stage, Stage::Entities | Stage::Relations);
        if chunked && (run.provider_calls + run.chunks_reused > 1 || run.from_checkpoint) {
            // Its chunks' outputs are in the checkpoint now.
            self.journal()?
                .drop_chunks(&state.id, state.generation, stage.name())
                .await
                .map_err(storage)?;
        }
        let run = run_of(state, stage);
        run.finished_at = Some(now);
        let took = (now - run.started_at).to_std().unwrap_or_default();
        run.duration_ms = Some(took.as_millis() as u64);
        if ran {
            metrics::stage_finished(stage, took);
        }
        // Here, not where the journal row is written: a stage adopted from its checkpoint
        // after a crash publishes what the crashed completion never committed.
        let progress = json!({"stage": stage.name(), "percent": stage.percent()});
        publish(ctx, state, "progress", progress).await;
        state.waiting = None;
        state.status = ExtractionStatus::Running;
        match stage.next() {
            Some(next) => {
                state.stage = Some(next);
                schedule_advance(ctx, state, next, 1, now).await
            }
            None => {
                let result: ExtractionResult = serde_json::from_value(output)
                    .map_err(|e| HandlerError::permanent("bad_checkpoint", e.to_string()))?;
                let journal = self.journal()?;
                let key = format!("g{}:complete", state.generation);
                let data = json!({"result": result});
                journal
                    .append(&state.id, &key, "complete", &data, None)
                    .await
                    .map_err(storage)?;
                let summary = json!({
                    "entities": result.entities.len(),
                    "relations": result.relations.len(),
                });
                publish(ctx, state, "complete", summary).await;
                state.result = Some(result);
                state.status = ExtractionStatus::Completed;
                state.finished_at = Some(now);
                metrics::extraction("completed");
                self.schedule_forget(ctx, state).await
            }
        }
    }

    async fn stage_failed(
        &self,
        ctx: &EntityContext,
        state: &mut ExtractionState,
        stage: Stage,
        failure: StageFailure,
    ) -> Result<(), HandlerError> {
        let now = Utc::now();
        let config = &self.pipeline.config;
        match failure {
            StageFailure::Storage(message) => Err(HandlerError::retryable("storage", message)),
            StageFailure::Fatal(kind, message) => self.fail(ctx, state, stage, kind, message).await,
            StageFailure::Wait {
                after,
                reason,
                breaker_open,
            } => {
                state.status = if breaker_open {
                    ExtractionStatus::ProviderUnavailable
                } else {
                    ExtractionStatus::Running
                };
                state.waiting = Some(reason);
                let run = run_of(state, stage);
                let attempt = run.failed_attempts + run.invalid_outputs + 1;
                let at = now + chrono::Duration::from_std(after).unwrap_or_default();
                schedule_advance(ctx, state, stage, attempt, at).await
            }
            StageFailure::Unavailable(kind, message) => {
                let run = run_of(state, stage);
                run.last_error = Some(message.clone());
                run.failed_attempts += 1;
                if run.failed_attempts >= config.stage_attempts {
                    return self.fail(ctx, state, stage, kind, message).await;
                }
                self.retry_later(ctx, state, stage, None, &message).await
            }
            StageFailure::Retry(error) => {
                let run = run_of(state, stage);
                run.last_error = Some(error.to_string());
                let (kind, exhausted) = match &error {
                    ProviderError::InvalidOutput(_) => {
                        run.invalid_outputs += 1;
                        (
                            FailureKind::InvalidOutput,
                            run.invalid_outputs >= config.invalid_output_attempts,
                        )
                    }
                    ProviderError::Timeout(_) => {
                        run.failed_attempts += 1;
                        (
                            FailureKind::Timeout,
                            run.failed_attempts >= config.stage_attempts,
                        )
                    }
                    _ => {
                        run.failed_attempts += 1;
                        (
                            FailureKind::Provider,
                            run.failed_attempts >= config.stage_attempts,
                        )
                    }
                };
                if exhausted {
                    return self.fail(ctx, state, stage, kind, error.to_string()).await;
                }
                let retry_after = error.retry_after();
                self.retry_later(ctx, state, stage, retry_after, &error.to_string())
                    .await
            }
        }
    }

    /// Schedules the stage's next attempt after the backoff for the failures counted so
    /// far (at least `retry_after`), noting `reason` as what it waits for.
    async fn retry_later(
        &self,
        ctx: &EntityContext,
        state: &mut ExtractionState,
        stage: Stage,
        retry_after: Option<Duration>,
        reason: &str,
    ) -> Result<(), HandlerError> {
        let config = &self.pipeline.config;
        let run = run_of(state, stage);
        let failures = run.failed_attempts + run.invalid_outputs;
        let backoff = shoal::backoff::Backoff::nth(config.backoff_first, failures - 1, 16)
            .min(config.backoff_max);
        let delay = shoal::backoff::jittered(backoff).max(retry_after.unwrap_or_default());
        state.status = ExtractionStatus::Running;
        state.waiting = Some(format!("retrying after: {reason}"));
        let at = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
        schedule_advance(ctx, state, stage, failures + 1, at).await
    }

    async fn fail(
        &self,
        ctx: &EntityContext,
        state: &mut ExtractionState,
        stage: Stage,
        kind: FailureKind,
        message: String,
    ) -> Result<(), HandlerError> {
        let failure = ExtractionFailure {
            kind,
            stage,
            message,
        };
        let key = format!("g{}:failed", state.generation);
        self.journal()?
            .append(&state.id, &key, "failed", &json!({"error": failure}), None)
            .await
            .map_err(storage)?;
        publish(ctx, state, "failed", json!({"error": failure})).await;
        let now = Utc::now();
        state.error = Some(failure);
        state.status = ExtractionStatus::Failed;
        state.waiting = None;
        state.finished_at = Some(now);
        state.updated_at = Some(now);
        let kind = serde_json::to_value(kind).ok();
        let kind = kind.as_ref().and_then(Value::as_str).unwrap_or("unknown");
        metrics::extraction(&format!("failed_{kind}"));
        self.schedule_forget(ctx, state).await
    }

    async fn schedule_forget(
        &self,
        ctx: &EntityContext,
        state: &ExtractionState,
    ) -> Result<(), HandlerError> {
        let at = Utc::now()
            + chrono::Duration::from_std(self.pipeline.config.keep_handle)
                .unwrap_or(chrono::Duration::MAX);
        let body = json!({"generation": state.generation});
        ctx.schedule(Request::persisted(ctx.address.clone(), "forget", body), at)
            .await
            .map_err(|e| HandlerError::retryable("schedule_failed", e.to_string()))?;
        Ok(())
    }
}

/// The entity id of an extraction.
pub fn entity_id(id: &ExtractionId) -> &str {
    id.as_str()
}
