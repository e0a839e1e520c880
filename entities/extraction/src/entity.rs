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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shoal::client::Request;
use shoal::entity::{Entity, EntityContext, EntityOptions, EntityProtocol, HandlerError};
use shoal::redis::cache::Cache;
use tracing::Instrument;
use utoipa::ToSchema;

use super::config::ExtractionConfig;
use super::journal::Journal;
use super::model::{
    Chunk, ExtractedEntity, ExtractionFailure, ExtractionId, ExtractionRequest, ExtractionResult,
    FailureKind, Mention, Stage,
};
use super::ontology::{Ontologies, Ontology};
use super::provider::gate::{GateRefusal, ProviderGate};
use super::provider::{Call, Output, Provider, ProviderError, Reply, Task};
use super::{metrics, pipeline};
use shoal_notifications::entity::{NewEvent, Notification, NotificationMessage};

/// A provider with its gate.
#[derive(Debug, Clone)]
pub struct ProviderSlot {
    /// The provider.
    pub provider: Arc<dyn Provider>,
    /// Its limits and breaker.
    pub gate: ProviderGate,
}

/// What the pipeline runs with.
#[derive(Debug)]
pub struct Pipeline {
    /// The ontologies.
    pub ontologies: Ontologies,
    /// The providers by name.
    pub providers: BTreeMap<String, ProviderSlot>,
    /// The journal and result store (none on a node that only routes).
    pub journal: Option<Journal>,
    /// The Redis result cache (none without Redis).
    pub cache: Option<Cache<Value>>,
    /// `[extraction]`.
    pub config: ExtractionConfig,
}

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

/// Where an extraction stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExtractionStatus {
    /// Never started (or forgotten).
    #[default]
    New,
    /// A stage is running or due.
    Running,
    /// Paused: the provider's breaker is open (every runner sees it).
    ProviderUnavailable,
    /// Finished with a result.
    Completed,
    /// Finished with a typed error.
    Failed,
}

impl ExtractionStatus {
    /// Whether the extraction has ended.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }
}

/// One stage's run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StageRun {
    /// The stage.
    pub stage: Stage,
    /// Failed attempts (retryable failures).
    pub failed_attempts: u32,
    /// Outputs that did not validate.
    pub invalid_outputs: u32,
    /// Provider calls made.
    pub provider_calls: u32,
    /// Time provider limits held its calls back (first refusal to admission), ms.
    #[serde(default)]
    pub limit_wait_ms: u64,
    /// Chunks whose stored output the latest attempt reused instead of calling the provider.
    #[serde(default)]
    pub chunks_reused: u32,
    /// When it first started.
    pub started_at: DateTime<Utc>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// `finished_at − started_at`, milliseconds.
    pub duration_ms: Option<u64>,
    /// Whether its checkpoint was found (a resumed run: no provider call).
    pub from_checkpoint: bool,
    /// The last failure.
    pub last_error: Option<String>,
}

/// The extraction's state (its entity's, in Postgres).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExtractionState {
    /// The extraction's id.
    pub id: String,
    /// Where it stands.
    pub status: ExtractionStatus,
    /// Runs of this id so far (a forgotten failure may run again).
    pub generation: u32,
    /// The request.
    pub request: Option<ExtractionRequest>,
    /// The current stage.
    pub stage: Option<Stage>,
    /// The stages run so far.
    pub stages: Vec<StageRun>,
    /// Why it waits, if it does.
    pub waiting: Option<String>,
    /// Since when a provider limit has held the current stage.
    pub limited_since: Option<DateTime<Utc>>,
    /// The result.
    pub result: Option<ExtractionResult>,
    /// The failure.
    pub error: Option<ExtractionFailure>,
    /// Requests that attached to this run.
    pub dedup_hits: u32,
    /// When it started.
    pub created_at: Option<DateTime<Utc>>,
    /// When it last changed.
    pub updated_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
}

/// An extraction's messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ExtractionMessage {
    /// Starts the extraction (or attaches to it).
    Start(ExtractionRequest),
    /// Runs `stage` (attempt `attempt` of generation `generation`).
    Advance {
        /// The stage.
        stage: Stage,
        /// The run.
        generation: u32,
        /// 1-based attempt of the stage.
        attempt: u32,
    },
    /// Forgets a run that finished in `generation`.
    Forget {
        /// The run.
        generation: u32,
    },
    /// Reads the state.
    Get {},
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

/// How a stage attempt failed.
#[derive(Debug)]
enum StageFailure {
    /// Not now: try the same attempt again after `after` (a limit, an open breaker).
    Wait {
        after: Duration,
        reason: String,
        breaker_open: bool,
    },
    /// The attempt failed retryably.
    Retry(ProviderError),
    /// Something the stage needs is not here yet (retryable within the attempt budget,
    /// then the extraction fails with this kind).
    Unavailable(FailureKind, String),
    /// The extraction cannot succeed.
    Fatal(FailureKind, String),
    /// Storage failed: the handler fails retryably and runs again.
    Storage(String),
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

fn stage_key(generation: u32, stage: Stage) -> String {
    format!("g{generation}:stage:{}", stage.name())
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
        match self.execute(state, stage).await {
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

    /// Runs `stage` on the checkpoints before it.
    async fn execute(
        &self,
        state: &mut ExtractionState,
        stage: Stage,
    ) -> Result<Value, StageFailure> {
        let request = state
            .request
            .clone()
            .ok_or_else(|| StageFailure::Fatal(FailureKind::Provider, "no request".into()))?;
        let ontology = self.ontology(&request).await?;
        match stage {
            Stage::Preprocess => {
                let text = pipeline::normalise(&request.text);
                let chunks = pipeline::chunk(&text, self.pipeline.config.chunk_tokens);
                Ok(json!({"chunks": chunks}))
            }
            Stage::Entities => {
                let chunks: Vec<Chunk> = self.load(state, Stage::Preprocess, "chunks").await?;
                let mut mentions: Vec<Mention> = Vec::new();
                for output in self
                    .per_chunk(state, stage, &request, &ontology, &chunks, &[])
                    .await?
                {
                    if let Output::Mentions(found) = output {
                        mentions.extend(found);
                    }
                }
                Ok(json!({"mentions": mentions}))
            }
            Stage::Resolve => {
                let mentions: Vec<Mention> = self.load(state, Stage::Entities, "mentions").await?;
                Ok(json!({"entities": pipeline::resolve(&mentions, &ontology)}))
            }
            Stage::Relations => {
                let chunks: Vec<Chunk> = self.load(state, Stage::Preprocess, "chunks").await?;
                let entities: Vec<ExtractedEntity> =
                    self.load(state, Stage::Resolve, "entities").await?;
                let mut stated = Vec::new();
                if entities.len() >= 2 {
                    for output in self
                        .per_chunk(state, stage, &request, &ontology, &chunks, &entities)
                        .await?
                    {
                        if let Output::Relations(found) = output {
                            stated.extend(found);
                        }
                    }
                }
                let (relations, rejected) =
                    pipeline::check_relations(&stated, &entities, &ontology);
                Ok(json!({"relations": relations, "rejected": rejected}))
            }
            Stage::Persist => self.persist(state, &request).await,
        }
    }

    async fn persist(
        &self,
        state: &mut ExtractionState,
        request: &ExtractionRequest,
    ) -> Result<Value, StageFailure> {
        let entities = self.load(state, Stage::Resolve, "entities").await?;
        let relations = self.load(state, Stage::Relations, "relations").await?;
        let rejected: u32 = self.load(state, Stage::Relations, "rejected").await?;
        let result = ExtractionResult {
            id: state.id.clone(),
            ontology_id: request.ontology_id.clone(),
            ontology_version: request.ontology_version.clone(),
            provider: request.provider.clone(),
            model: request.model.clone(),
            entities,
            relations,
            rejected_relations: rejected,
        };
        let value =
            serde_json::to_value(&result).map_err(|e| StageFailure::Storage(e.to_string()))?;
        if let Some(journal) = &self.pipeline.journal {
            journal
                .put_result(&state.id, request.tenant.as_deref(), &value)
                .await
                .map_err(|e| StageFailure::Storage(e.to_string()))?;
        }
        if let Some(cache) = &self.pipeline.cache {
            cache
                .put(&state.id, &value)
                .await
                .map_err(|e| StageFailure::Wait {
                    after: self.pipeline.config.backoff_first,
                    reason: format!("redis_unavailable: {e}"),
                    breaker_open: false,
                })?;
        }
        Ok(value)
    }

    /// The ontology version the request pinned. A version this node has not read yet
    /// makes it re-read the directory (the gateway re-read a changed file first), then load
    /// the version other nodes stored (the file changed before this node started); still
    /// missing, the stage retries within its attempt budget, then fails `ontology`.
    async fn ontology(&self, request: &ExtractionRequest) -> Result<Arc<Ontology>, StageFailure> {
        let ontologies = &self.pipeline.ontologies;
        let (id, version) = (&request.ontology_id, &request.ontology_version);
        if let Some(ontology) = ontologies.version(id, version) {
            return Ok(ontology);
        }
        let reloading = ontologies.clone();
        let _ = tokio::task::spawn_blocking(move || reloading.reload()).await;
        if let Some(ontology) = ontologies.version(id, version) {
            return Ok(ontology);
        }
        // Changed before this node read it: the version as a node that offered it stored it.
        if let Some(journal) = &self.pipeline.journal {
            let stored = journal
                .ontology_source(id, version)
                .await
                .map_err(|e| StageFailure::Storage(e.to_string()))?;
            if let Some(source) = stored {
                match Ontology::parse(id, &source) {
                    Ok(ontology) if ontology.version == *version => {
                        return Ok(ontologies.adopt(ontology));
                    }
                    Ok(other) => tracing::warn!(
                        ontology = %id, %version, read = %other.version,
                        "a stored ontology version does not hash to its version"
                    ),
                    Err(error) => {
                        tracing::warn!(%error, "a stored ontology version does not parse")
                    }
                }
            }
        }
        ontologies.version(id, version).ok_or_else(|| {
            let here = ontologies
                .get(id)
                .map_or_else(|| "none".to_owned(), |o| o.version.clone());
            StageFailure::Unavailable(
                FailureKind::Ontology,
                format!("ontology `{id}` version {version} is not loaded here (current: {here})"),
            )
        })
    }

    /// Field `field` of `stage`'s checkpoint.
    async fn load<T: serde::de::DeserializeOwned>(
        &self,
        state: &ExtractionState,
        stage: Stage,
        field: &str,
    ) -> Result<T, StageFailure> {
        let journal = self
            .pipeline
            .journal
            .as_ref()
            .ok_or_else(|| StageFailure::Storage("no journal".into()))?;
        let checkpoint = journal
            .checkpoint(&state.id, &stage_key(state.generation, stage))
            .await
            .map_err(|e| StageFailure::Storage(e.to_string()))?
            .ok_or_else(|| StageFailure::Storage(format!("no checkpoint of {}", stage.name())))?;
        serde_json::from_value(checkpoint.get(field).cloned().unwrap_or(Value::Null))
            .map_err(|e| StageFailure::Storage(format!("checkpoint of {}: {e}", stage.name())))
    }

    /// The provider's output for each of `chunks`, in order: chunks an earlier attempt of
    /// this stage finished are taken from their stored outputs, the rest are called one by
    /// one, each output stored as it returns (when there is more than one chunk; a single
    /// chunk's output is the stage's checkpoint itself). So a stage cut short after `k` of
    /// its chunks (a limit refusal, a retryable failure, a failover) resumes at chunk `k`.
    async fn per_chunk(
        &self,
        state: &mut ExtractionState,
        stage: Stage,
        request: &ExtractionRequest,
        ontology: &Ontology,
        chunks: &[Chunk],
        entities: &[ExtractedEntity],
    ) -> Result<Vec<Output>, StageFailure> {
        let journal = self
            .pipeline
            .journal
            .as_ref()
            .ok_or_else(|| StageFailure::Storage("no journal".into()))?;
        let storage = |e: super::journal::JournalError| StageFailure::Storage(e.to_string());
        let stored = if chunks.len() > 1 {
            journal
                .chunk_outputs(&state.id, state.generation, stage.name())
                .await
                .map_err(storage)?
        } else {
            BTreeMap::new()
        };
        run_of(state, stage).chunks_reused = 0;
        let mut outputs = Vec::with_capacity(chunks.len());
        for (index, chunk) in chunks.iter().enumerate() {
            let index = index as u32;
            if let Some(output) = stored.get(&index)
                && let Ok(output) = serde_json::from_value::<Output>(output.clone())
            {
                run_of(state, stage).chunks_reused += 1;
                outputs.push(output);
                continue;
            }
            let task = match stage {
                Stage::Relations => Task::Relations {
                    text: &chunk.text,
                    entities,
                },
                _ => Task::Mentions { text: &chunk.text },
            };
            let output = self
                .call(state, stage, request, ontology, task)
                .await?
                .output;
            if chunks.len() > 1 {
                let value = serde_json::to_value(&output)
                    .map_err(|e| StageFailure::Storage(e.to_string()))?;
                journal
                    .put_chunk(&state.id, state.generation, stage.name(), index, &value)
                    .await
                    .map_err(storage)?;
            }
            outputs.push(output);
        }
        Ok(outputs)
    }

    /// One provider call through the provider's gate.
    async fn call(
        &self,
        state: &mut ExtractionState,
        stage: Stage,
        request: &ExtractionRequest,
        ontology: &Ontology,
        task: Task<'_>,
    ) -> Result<Reply, StageFailure> {
        let slot = self
            .pipeline
            .providers
            .get(&request.provider)
            .ok_or_else(|| {
                StageFailure::Fatal(
                    FailureKind::Provider,
                    format!("provider `{}` is not configured here", request.provider),
                )
            })?;
        let call = Call {
            task,
            ontology,
            model: &request.model,
            temperature: request.temperature,
            max_tokens: request.max_tokens,
        };
        let admitted = match slot.gate.admit(call.estimated_tokens()).await {
            Ok(admitted) => admitted,
            Err(refusal) => return Err(self.refused(state, &request.provider, refusal)),
        };
        if let Some(since) = state.limited_since.take() {
            let waited = (Utc::now() - since).to_std().unwrap_or_default();
            metrics::limit_wait(&request.provider, waited);
            run_of(state, stage).limit_wait_ms += waited.as_millis() as u64;
        }
        let timeout = self.pipeline.config.call_timeout;
        let result = tokio::time::timeout(timeout, slot.provider.call(&call))
            .await
            .unwrap_or(Err(ProviderError::Timeout(timeout)));
        slot.gate.finish(admitted, &result).await;
        run_of(state, stage).provider_calls += 1;
        match &result {
            Ok(reply) => metrics::provider_call(
                &request.provider,
                "ok",
                reply.usage.input_tokens,
                reply.usage.output_tokens,
            ),
            Err(error) => metrics::provider_call(&request.provider, error.code(), 0, 0),
        }
        result.map_err(|error| match error {
            ProviderError::Rejected { .. } => {
                StageFailure::Fatal(FailureKind::Provider, error.to_string())
            }
            other => StageFailure::Retry(other),
        })
    }

    fn refused(
        &self,
        state: &mut ExtractionState,
        provider: &str,
        refusal: GateRefusal,
    ) -> StageFailure {
        match refusal {
            GateRefusal::Limited { retry_after, .. } => {
                metrics::limited(provider);
                state.limited_since.get_or_insert_with(Utc::now);
                StageFailure::Wait {
                    after: shoal::backoff::jittered(retry_after),
                    reason: refusal.to_string(),
                    breaker_open: false,
                }
            }
            GateRefusal::Open { retry_after, .. } => StageFailure::Wait {
                after: retry_after,
                reason: refusal.to_string(),
                breaker_open: true,
            },
            GateRefusal::Redis(_) => StageFailure::Wait {
                after: self.pipeline.config.backoff_first,
                reason: refusal.to_string(),
                breaker_open: false,
            },
            GateRefusal::TooLarge(message) => StageFailure::Fatal(FailureKind::Provider, message),
        }
    }
}

fn run_of(state: &mut ExtractionState, stage: Stage) -> &mut StageRun {
    let index = state
        .stages
        .iter()
        .position(|r| r.stage == stage)
        .unwrap_or_else(|| {
            state.stages.push(StageRun {
                stage,
                failed_attempts: 0,
                invalid_outputs: 0,
                provider_calls: 0,
                limit_wait_ms: 0,
                chunks_reused: 0,
                started_at: Utc::now(),
                finished_at: None,
                duration_ms: None,
                from_checkpoint: false,
                last_error: None,
            });
            state.stages.len() - 1
        });
    &mut state.stages[index]
}

fn forget(state: &mut ExtractionState, generation: u32) {
    if state.status.is_finished() && state.generation == generation {
        *state = ExtractionState {
            id: state.id.clone(),
            generation,
            ..ExtractionState::default()
        };
    }
}

/// Schedules `advance {stage, attempt}` for `at` (in the completion's outbox either way).
/// Publishes an event of the extraction on the requesting tenant's notification stream
/// (topic `extraction`, data `{id, kind, …}`), if the first request named a tenant: a
/// send through the handler's context, so it rides on the completion (the outbox) and the
/// stream shows each step once, when it committed. A send that cannot be made is logged;
/// it never fails the extraction. The result itself stays at `GET /extractions/{id}`
/// (`complete` carries only its counts).
async fn publish(ctx: &EntityContext, state: &ExtractionState, kind: &str, mut data: Value) {
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

async fn schedule_advance(
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

/// The entity id of an extraction.
pub fn entity_id(id: &ExtractionId) -> &str {
    id.as_str()
}
