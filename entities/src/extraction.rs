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
//! - [`model`]: ids (content addresses), requests, stages, results, failures.
//! - [`ontology`]: Turtle ontologies, versioned by content hash.
//! - [`provider`]: the `Provider` trait, the built-in extractor, the HTTP clients, the gate.
//! - [`pipeline`]: the stages' pure logic; [`entity`]: the entity that runs them.
//! - [`journal`]: events, checkpoints and results in Postgres; `sse`: the events as SSE.
//! - [`routes`]: the HTTP API; [`jsonld`]: results as JSON-LD.
//! - [`prune`]: the singleton that removes old journals, chunk outputs and results.

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

    /// The ontologies, re-read every `ontology-reload-interval` (inside a Tokio runtime).
    fn ontologies(&self) -> Result<Ontologies, ExtractionSetupError> {
        let ontologies = Ontologies::load(&self.config.ontologies)?;
        ontologies.reload_every(self.config.ontology_reload_interval);
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
    pub fn api(&self) -> Result<routes::ExtractionApi, ExtractionSetupError> {
        self.config.validate()?;
        let http = reqwest::Client::new();
        let models = self
            .config
            .build_providers(&http)
            .into_iter()
            .map(|(name, provider)| (name, provider.default_model().to_owned()))
            .collect();
        Ok(routes::ExtractionApi {
            ontologies: self.ontologies()?,
            config: self.config.clone(),
            models,
            journal: self.journal(),
            cache: self.cache(),
            watch: JournalWatch::default(),
        })
    }
}
