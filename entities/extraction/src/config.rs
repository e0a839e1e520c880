//! The application's `[extraction]` section (`SHOAL__EXTRACTION__…` in the environment),
//! read by runners (the pipeline) and gateways (defaults, ids, the wait bound) alike.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::provider::Provider;
use super::provider::anthropic::Anthropic;
use super::provider::builtin::Builtin;
use super::provider::http::HttpEndpoint;
use super::provider::openai::OpenAi;

/// `[extraction]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ExtractionConfig {
    /// The provider of requests that name none. Default `builtin`.
    pub default_provider: String,
    /// Where the Turtle ontologies are. Default `cluster-config/ontologies`.
    pub ontologies: PathBuf,
    /// How long a finished extraction's entity (the dedup handle) is kept. Default 1 h.
    #[serde(with = "humantime_serde")]
    pub keep_handle: Duration,
    /// Longest `?wait=true` waits before answering 202. Default 20 s.
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// Attempts per stage for retryable failures. Default 5.
    pub stage_attempts: u32,
    /// Invalid outputs per stage before it fails `invalid_output`. Default 3.
    pub invalid_output_attempts: u32,
    /// First wait after a failed attempt, doubling with jitter. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub backoff_first: Duration,
    /// Longest wait between attempts. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// One provider call's timeout. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// Token budget of one chunk (about 4 bytes a token). Default 1500.
    pub chunk_tokens: u32,
    /// How long an ended extraction's journal (its events and checkpoints) is kept.
    /// Default 7 days.
    #[serde(with = "humantime_serde")]
    pub journal_retention: Duration,
    /// How long a finished result is kept in Postgres (then the same inputs run again).
    /// Default 30 days.
    #[serde(with = "humantime_serde")]
    pub result_retention: Duration,
    /// How often the pruner runs. Default 10 min.
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
    /// Rows one pruning statement removes at most. Default 1000.
    pub prune_batch: u32,
    /// Pause between two pruning statements. Default 50 ms.
    #[serde(with = "humantime_serde")]
    pub prune_pause: Duration,
    /// How often nodes re-read `ontologies` (a changed file becomes a new version without
    /// a restart; `0s` turns it off). Default 30 s.
    #[serde(with = "humantime_serde")]
    pub ontology_reload_interval: Duration,
    /// One extraction per inputs across tenants (read by gateways): the same text from two
    /// tenants is one run, a second tenant is answered `cached: true` from the first's
    /// result, and any tenant that holds an id reads it — which tells a tenant that someone
    /// sent that text. Off by default: the tenant is part of an extraction's id, dedup,
    /// cache and events, and another tenant's id is a 404. Default `false`.
    pub shared_cache: bool,
    /// `[extraction.providers.<name>]`: the HTTP providers (`builtin` is always there).
    pub providers: BTreeMap<String, ProviderConfig>,
}

impl Default for ExtractionConfig {
    fn default() -> Self {
        Self {
            default_provider: "builtin".to_owned(),
            ontologies: PathBuf::from("cluster-config/ontologies"),
            keep_handle: Duration::from_secs(3600),
            wait_timeout: Duration::from_secs(20),
            stage_attempts: 5,
            invalid_output_attempts: 3,
            backoff_first: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            call_timeout: Duration::from_secs(60),
            chunk_tokens: 1500,
            journal_retention: Duration::from_secs(7 * 24 * 3600),
            result_retention: Duration::from_secs(30 * 24 * 3600),
            prune_interval: Duration::from_secs(600),
            prune_batch: 1000,
            prune_pause: Duration::from_millis(50),
            ontology_reload_interval: Duration::from_secs(30),
            shared_cache: false,
            providers: BTreeMap::new(),
        }
    }
}

/// The wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    /// OpenAI-compatible chat completions.
    Openai,
    /// Anthropic Messages.
    Anthropic,
}

/// `[extraction.providers.<name>]`. Its limits are `[redis.providers.<name>]`, its breaker
/// `provider:<name>` with `[redis.breaker]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ProviderConfig {
    /// `openai` or `anthropic`.
    pub kind: ProviderKind,
    /// The API's base URL, without `/v1` (`https://api.openai.com`).
    pub base_url: String,
    /// The default model.
    pub model: String,
    /// The API key (prefer `api-key-env`).
    #[serde(default)]
    pub api_key: Option<String>,
    /// The environment variable holding the API key (default `OPENAI_API_KEY` or
    /// `ANTHROPIC_API_KEY` by kind).
    #[serde(default)]
    pub api_key_env: Option<String>,
}

/// Why the section is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ExtractionConfigError {
    /// A field's value is out of range.
    #[error("extraction.{field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl ExtractionConfig {
    /// Checks the values once at start-up.
    pub fn validate(&self) -> Result<(), ExtractionConfigError> {
        let invalid = |field, message: &str| {
            Err(ExtractionConfigError::Invalid {
                field,
                message: message.to_owned(),
            })
        };
        if self.stage_attempts == 0 {
            return invalid("stage-attempts", "must be at least 1");
        }
        if self.invalid_output_attempts == 0 {
            return invalid("invalid-output-attempts", "must be at least 1");
        }
        if self.chunk_tokens < 16 {
            return invalid("chunk-tokens", "must be at least 16");
        }
        if self.journal_retention <= self.keep_handle {
            // A kept handle serves its journal (`GET /extractions/{id}/events`).
            return invalid("journal-retention", "must be longer than keep-handle");
        }
        if self.prune_batch == 0 {
            return invalid("prune-batch", "must be at least 1");
        }
        if self.prune_interval.is_zero() {
            return invalid("prune-interval", "must be above zero");
        }
        if self.providers.contains_key("builtin") {
            return invalid("providers", "`builtin` is the built-in extractor's name");
        }
        if self.default_provider != "builtin"
            && !self.providers.contains_key(&self.default_provider)
        {
            return invalid("default-provider", "names no configured provider");
        }
        Ok(())
    }

    /// Every provider by name (`builtin` and the configured ones).
    pub fn build_providers(&self, http: &reqwest::Client) -> BTreeMap<String, Arc<dyn Provider>> {
        let mut providers: BTreeMap<String, Arc<dyn Provider>> = BTreeMap::new();
        providers.insert("builtin".to_owned(), Arc::new(Builtin));
        for (name, config) in &self.providers {
            let env = config.api_key_env.clone().unwrap_or_else(|| {
                match config.kind {
                    ProviderKind::Openai => "OPENAI_API_KEY",
                    ProviderKind::Anthropic => "ANTHROPIC_API_KEY",
                }
                .to_owned()
            });
            let key = config.api_key.clone().or_else(|| std::env::var(env).ok());
            let endpoint = HttpEndpoint::new(
                http.clone(),
                &config.base_url,
                key,
                &config.model,
                self.call_timeout,
            );
            let provider: Arc<dyn Provider> = match config.kind {
                ProviderKind::Openai => Arc::new(OpenAi::new(endpoint)),
                ProviderKind::Anthropic => Arc::new(Anthropic::new(endpoint)),
            };
            providers.insert(name.clone(), provider);
        }
        providers
    }
}
