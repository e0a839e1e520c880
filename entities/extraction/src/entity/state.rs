//! The extraction entity's state and messages: what each completion persists, what
//! `GET /extractions/{id}` shows, and the two plain changes the handler makes to it (the
//! run record of a stage, [`run_of`]; forgetting a finished run, [`forget`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::model::{ExtractionFailure, ExtractionRequest, ExtractionResult, Stage};

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

/// The run of `stage` (started now if it has none yet).
pub(super) fn run_of(state: &mut ExtractionState, stage: Stage) -> &mut StageRun {
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

/// Empties the state of a run that finished in `generation` (the dedup handle goes; the
/// result stays in the result store and cache).
pub(super) fn forget(state: &mut ExtractionState, generation: u32) {
    if state.status.is_finished() && state.generation == generation {
        *state = ExtractionState {
            id: state.id.clone(),
            generation,
            ..ExtractionState::default()
        };
    }
}
