//! Running one stage: what the pipeline runs with ([`Pipeline`]: the ontologies, the
//! providers behind their gates, the journal, the cache, `[extraction]`) and each stage's
//! work on the checkpoints before it. A chunked stage calls the provider chunk by chunk
//! through the provider's gate, storing each chunk's output, so one cut short resumes at
//! its next chunk; the ontology version the request pinned is found, re-read or adopted
//! from storage. A failed attempt comes back as a [`StageFailure`]; what to do about it
//! (wait, retry, fail) is the handler's (the parent module).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};
use shoal::redis::cache::Cache;

use super::state::{ExtractionState, run_of};
use crate::config::ExtractionConfig;
use crate::journal::{Journal, JournalError};
use crate::model::{
    Chunk, ExtractedEntity, ExtractionRequest, ExtractionResult, FailureKind, Mention, Stage,
};
use crate::ontology::{Ontologies, Ontology};
use crate::provider::gate::{GateRefusal, ProviderGate};
use crate::provider::{Call, Output, Provider, ProviderError, Reply, Task};
use crate::{metrics, pipeline};

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

/// How a stage attempt failed.
#[derive(Debug)]
pub(super) enum StageFailure {
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

/// The journal key of `stage`'s checkpoint in run `generation`.
pub(super) fn stage_key(generation: u32, stage: Stage) -> String {
    format!("g{generation}:stage:{}", stage.name())
}

impl Pipeline {
    /// Runs `stage` on the checkpoints before it.
    pub(super) async fn execute(
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
                let chunks = pipeline::chunk(&text, self.config.chunk_tokens);
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
        if let Some(journal) = &self.journal {
            journal
                .put_result(&state.id, request.tenant.as_deref(), &value)
                .await
                .map_err(|e| StageFailure::Storage(e.to_string()))?;
        }
        if let Some(cache) = &self.cache {
            cache
                .put(&state.id, &value)
                .await
                .map_err(|e| StageFailure::Wait {
                    after: self.config.backoff_first,
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
        let ontologies = &self.ontologies;
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
        if let Some(journal) = &self.journal {
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
            .journal
            .as_ref()
            .ok_or_else(|| StageFailure::Storage("no journal".into()))?;
        let storage = |e: JournalError| StageFailure::Storage(e.to_string());
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
        let slot = self.providers.get(&request.provider).ok_or_else(|| {
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
        let timeout = self.config.call_timeout;
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
                after: self.config.backoff_first,
                reason: refusal.to_string(),
                breaker_open: false,
            },
            GateRefusal::TooLarge(message) => StageFailure::Fatal(FailureKind::Provider, message),
        }
    }
}
