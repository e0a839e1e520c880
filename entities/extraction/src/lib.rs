//! Extraction: text + ontology → a knowledge graph, by a language-model provider in
//! stages, durable across failovers. See docs/ARCHITECTURE.md "Built-in entities →
//! extraction".
//!
//! ```text
//! POST /extractions ─▶ routes (validate, content address, cache) ─▶ extraction entity
//!        preprocess → entities → resolve → relations → persist     (one `advance` each)
//!        each stage: checkpoint in the journal ─▶ next `advance` in the outbox
//!        provider calls: gate (Redis limits + breaker) ─▶ builtin | openai | anthropic
//! GET /extractions/{id}/events ◀── sse (the journal)
//! ```
//!
//! - [`model`]: ids (content addresses over the normalised text), requests, stages,
//!   results, failures.
//! - [`ontology`]: Turtle ontologies, versioned by content hash: the registry
//!   (`ontology.rs`), what an ontology is reduced to (`ontology/vocabulary.rs`), the Turtle
//!   reader (`ontology/turtle.rs`).
//! - [`provider`]: the `Provider` trait, the built-in extractor, the HTTP clients, the gate.
//! - [`pipeline`]: the stages' pure logic; [`entity`]: the entity that runs them (its
//!   handler in `entity.rs`, its state and messages in `entity/state.rs`, the stage runner
//!   in `entity/runner.rs`, what a completion sends in `entity/outbox.rs`).
//! - [`journal`]: events, checkpoints and results in Postgres; `sse`: the events as SSE.
//! - [`routes`]: the HTTP API; `api`: what the routes and `sse` share (the API state, the
//!   tenant read check, path-id parsing), below both; [`jsonld`]: results as JSON-LD.
//! - [`prune`]: the singleton that removes old journals, chunk outputs and results.

mod api;
pub mod config;
pub mod entity;
pub mod journal;
pub mod jsonld;
mod metrics;
pub mod model;
pub mod ontology;
pub mod pipeline;
pub mod provider;
pub mod prune;
pub mod routes;
mod sse;
pub mod watch;

use std::collections::BTreeMap;

use shoal::config::RedisConfig;
use shoal::redis::RedisClient;
use shoal::redis::breaker::CircuitBreaker;
use shoal::redis::cache::Cache;
use shoal::redis::limits::ProviderLimits;

pub use config::ExtractionConfig;
pub use entity::{Extraction, ExtractionMessage, ExtractionState, ExtractionStatus};
pub use model::{ExtractionId, Stage};

use entity::{Pipeline, ProviderSlot};
use journal::Journal;
use ontology::Ontologies;
use provider::gate::ProviderGate;
use watch::{JournalHints, JournalWatch};

/// What a node needs to run or route extractions.
#[derive(Debug, Clone)]
pub struct ExtractionSetup {
    /// `[extraction]`.
    pub config: ExtractionConfig,
    /// The database (journal, results), if the node has one.
    pub pool: Option<sqlx::PgPool>,
    /// The cluster's name (rows are per cluster).
    pub cluster: String,
    /// Redis (limits, breakers, cache), if configured.
    pub redis: Option<RedisClient>,
    /// `[redis]` (provider limits and the breaker's thresholds).
    pub redis_config: RedisConfig,
}

/// Why the setup is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ExtractionSetupError {
    /// `[extraction]` is invalid.
    #[error(transparent)]
    Config(#[from] config::ExtractionConfigError),
    /// An ontology does not load.
    #[error(transparent)]
    Ontology(#[from] ontology::OntologyError),
    /// A provider's limits are unusable.
    #[error("provider `{provider}` limits: {message}")]
    Limits {
        /// The provider.
        provider: String,
        /// What is wrong.
        message: String,
    },
}

/// Registers the `extraction` entity type in `registry`, its pipeline built from `setup`
/// (`[extraction]`, its database, Redis for the shared provider limits). The routes are
/// [`routes::routes`] over [`ExtractionSetup::api`], for the gateway.
pub fn register(
    registry: &mut shoal::entity::EntityRegistry,
    setup: &ExtractionSetup,
) -> Result<(), RegisterError> {
    registry.register(Extraction::new(std::sync::Arc::new(setup.pipeline()?)))?;
    Ok(())
}

/// Why [`register`] failed (at start-up: nothing to retry).
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The pipeline could not be built from the configuration.
    #[error(transparent)]
    Setup(#[from] ExtractionSetupError),
    /// The type clashes with one registered before.
    #[error(transparent)]
    Registry(#[from] shoal::entity::RegistryError),
}

impl ExtractionSetup {
    /// A setup with the defaults and no database or Redis (schemas, tests).
    pub fn offline() -> Self {
        Self {
            config: ExtractionConfig::default(),
            pool: None,
            cluster: "default".to_owned(),
            redis: None,
            redis_config: RedisConfig::default(),
        }
    }

    fn journal(&self) -> Option<Journal> {
        self.pool.clone().map(|pool| {
            Journal::new(
                pool,
                &self.cluster,
                self.redis.clone().map(JournalHints::new),
            )
        })
    }

    fn cache(&self) -> Option<Cache<serde_json::Value>> {
        self.redis
            .clone()
            .map(|redis| Cache::extraction(redis, &self.redis_config.cache))
    }

    /// The ontologies; inside a Tokio runtime, a task stores every version they offer and
    /// re-reads the directory every `ontology-reload-interval`, until they are dropped.
    fn ontologies(&self) -> Result<Ontologies, ExtractionSetupError> {
        let ontologies = Ontologies::load(&self.config.ontologies)?;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(keep_ontologies(
                ontologies.downgrade(),
                self.journal(),
                self.config.ontology_reload_interval,
            ));
        }
        Ok(ontologies)
    }

    /// The pipeline the entity runs (runners).
    pub fn pipeline(&self) -> Result<Pipeline, ExtractionSetupError> {
        self.config.validate()?;
        let ontologies = self.ontologies()?;
        let http = reqwest::Client::new();
        let mut providers = BTreeMap::new();
        for (name, provider) in self.config.build_providers(&http) {
            let gate = match (&self.redis, name.as_str()) {
                (Some(redis), n) if n != "builtin" => self.gate(redis, n)?,
                _ => ProviderGate::open(&name),
            };
            providers.insert(name, ProviderSlot { provider, gate });
        }
        Ok(Pipeline {
            ontologies,
            providers,
            journal: self.journal(),
            cache: self.cache(),
            config: self.config.clone(),
        })
    }

    fn gate(&self, redis: &RedisClient, name: &str) -> Result<ProviderGate, ExtractionSetupError> {
        let limits_config = self
            .redis_config
            .providers
            .get(name)
            .cloned()
            .unwrap_or_default();
        let limits = ProviderLimits::new(redis.clone(), name, &limits_config).map_err(|e| {
            ExtractionSetupError::Limits {
                provider: name.to_owned(),
                message: e.to_string(),
            }
        })?;
        let breaker = CircuitBreaker::new(
            redis.clone(),
            &format!("provider:{name}"),
            &self.redis_config.breaker,
        );
        Ok(ProviderGate::new(name, Some(limits), Some(breaker)))
    }

    /// What the routes need (gateways).
    pub fn api(&self) -> Result<api::ExtractionApi, ExtractionSetupError> {
        self.config.validate()?;
        let http = reqwest::Client::new();
        let models = self
            .config
            .build_providers(&http)
            .into_iter()
            .map(|(name, provider)| (name, provider.default_model().to_owned()))
            .collect();
        Ok(api::ExtractionApi {
            ontologies: self.ontologies()?,
            config: self.config.clone(),
            models,
            journal: self.journal(),
            cache: self.cache(),
            watch: JournalWatch::default(),
        })
    }
}

/// Stores each version `ontologies` offer (once it is stored, not again) and re-reads their
/// directory every `interval` (`0s`: never), until the ontologies are dropped. A version
/// that could not be stored is tried again on the next round.
async fn keep_ontologies(
    ontologies: ontology::WeakOntologies,
    journal: Option<Journal>,
    interval: std::time::Duration,
) {
    let mut stored = std::collections::HashSet::new();
    loop {
        let Some(current) = ontologies.upgrade().map(|o| o.current()) else {
            return;
        };
        if let Some(journal) = &journal {
            for ontology in current {
                let key = (ontology.id.clone(), ontology.version.clone());
                if stored.contains(&key) {
                    continue;
                }
                match journal.put_ontology(&ontology).await {
                    Ok(()) => {
                        stored.insert(key);
                    }
                    Err(error) => {
                        tracing::warn!(%error, ontology = %ontology.id, "could not store an ontology version");
                    }
                }
            }
        }
        if interval.is_zero() {
            return;
        }
        tokio::time::sleep(interval).await;
        let Some(handle) = ontologies.upgrade() else {
            return;
        };
        // Parsing is CPU work: off the async threads.
        let _ = tokio::task::spawn_blocking(move || handle.reload()).await;
    }
}
