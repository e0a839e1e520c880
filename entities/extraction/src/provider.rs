//! Providers: what turns a stage's task into typed output.
//!
//! A [`Provider`] gets a [`Call`] (the task, the ontology, model, temperature, max tokens)
//! and answers a [`Reply`] (the output and the tokens used) or a [`ProviderError`] that says
//! whether trying again may help. Three are built in: [`builtin::Builtin`] (deterministic,
//! offline, the default), [`openai::OpenAi`] (chat completions) and
//! [`anthropic::Anthropic`] (Messages). The HTTP ones ask for JSON that follows
//! [`output_schema`] and validate what comes back with [`parse_output`]: output that does not
//! decode or names what the ontology does not have is `invalid_output` (retryable, within its
//! own budget). Every call goes through a [`gate::ProviderGate`] (limits and breaker).

pub mod anthropic;
pub mod builtin;
pub mod gate;
pub mod http;
pub mod openai;

use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::model::{ExtractedEntity, Mention, StatedRelation};
use super::ontology::Ontology;

/// What a stage asks of a provider.
#[derive(Debug, Clone, Copy)]
pub enum Task<'a> {
    /// Find mentions of the ontology's classes in `text`.
    Mentions {
        /// One chunk.
        text: &'a str,
    },
    /// Find relations between `entities` stated in `text`.
    Relations {
        /// One chunk.
        text: &'a str,
        /// The resolved entities.
        entities: &'a [ExtractedEntity],
    },
}

impl Task<'_> {
    /// The chunk.
    pub fn text(&self) -> &str {
        match self {
            Task::Mentions { text } | Task::Relations { text, .. } => text,
        }
    }
}

/// One provider call.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// The task.
    pub task: Task<'a>,
    /// The ontology.
    pub ontology: &'a Ontology,
    /// The model.
    pub model: &'a str,
    /// Sampling temperature.
    pub temperature: f64,
    /// Largest completion, tokens.
    pub max_tokens: u32,
}

impl Call<'_> {
    /// Tokens the call is estimated to take (prompt at ~4 bytes a token, plus the
    /// completion budget), charged before the call and corrected by the reported usage.
    pub fn estimated_tokens(&self) -> u64 {
        let prompt = prompt(self).len() as u64 / 4 + 1;
        prompt + u64::from(self.max_tokens)
    }
}

/// A call's output (stored per chunk as `{"mentions": […]}` or `{"relations": […]}`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// Typed mentions.
    Mentions(Vec<Mention>),
    /// Stated relations.
    Relations(Vec<StatedRelation>),
}

/// Tokens a call used, as the provider reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
}

/// A provider's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The output.
    pub output: Output,
    /// What it cost.
    pub usage: Usage,
}

/// Why a provider call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// 429: over the provider's own limit (retryable, after `retry_after` when given).
    #[error("rate limited by the provider: {message}")]
    RateLimited {
        /// The provider's `Retry-After`.
        retry_after: Option<Duration>,
        /// Its message.
        message: String,
    },
    /// 5xx, 529, a connection error (retryable).
    #[error("provider unavailable ({status:?}): {message}")]
    Unavailable {
        /// The HTTP status, if there was an answer.
        status: Option<u16>,
        /// What happened.
        message: String,
        /// The provider's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// No answer within the call timeout (retryable).
    #[error("provider call timed out after {0:?}")]
    Timeout(Duration),
    /// Any other 4xx: the request is wrong (bad key, unknown model): permanent.
    #[error("provider refused the request ({status}): {message}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// Its message.
        message: String,
    },
    /// The output does not follow the schema or names what the ontology lacks (retryable
    /// within the invalid-output budget).
    #[error("invalid provider output: {0}")]
    InvalidOutput(String),
}

impl ProviderError {
    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, ProviderError::Rejected { .. })
    }

    /// Whether it says the provider is unwell (counted by the breaker): 429, 5xx,
    /// timeouts and connection errors. A rejected request or invalid output shows a provider
    /// that answers.
    pub fn counts_against_provider(&self) -> bool {
        matches!(
            self,
            ProviderError::RateLimited { .. }
                | ProviderError::Unavailable { .. }
                | ProviderError::Timeout(_)
        )
    }

    /// The wait the provider asked for.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::RateLimited { retry_after, .. }
            | ProviderError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The short name metrics and notes use.
    pub fn code(&self) -> &'static str {
        match self {
            ProviderError::RateLimited { .. } => "rate_limited",
            ProviderError::Unavailable { .. } => "unavailable",
            ProviderError::Timeout(_) => "timeout",
            ProviderError::Rejected { .. } => "rejected",
            ProviderError::InvalidOutput(_) => "invalid_output",
        }
    }
}

/// A language-model provider (or the built-in extractor).
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// The model used when a request names none.
    fn default_model(&self) -> &str;

    /// Makes one call.
    fn call<'a>(&'a self, call: &'a Call<'a>) -> BoxFuture<'a, Result<Reply, ProviderError>>;
}

/// The system instruction of the HTTP providers.
pub const SYSTEM: &str = "You extract a knowledge graph from text, using only the classes and \
properties of the given ontology. Answer only with JSON that follows the schema.";

/// The user prompt of a call: the ontology's vocabulary, the task and the text.
pub fn prompt(call: &Call<'_>) -> String {
    let classes: Vec<&str> = call
        .ontology
        .classes
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    match call.task {
        Task::Mentions { text } => format!(
            "Classes: {}.\nList every mention of an instance of these classes in the text, \
             with its class.\n\nText:\n{text}",
            classes.join(", ")
        ),
        Task::Relations { text, entities } => {
            let properties: Vec<String> = call
                .ontology
                .properties
                .iter()
                .map(|p| {
                    let domain = p.domain.as_deref().map(|d| call.ontology.compact(d));
                    let range = p.range.as_deref().map(|r| call.ontology.compact(r));
                    format!(
                        "{} ({} → {})",
                        p.name,
                        domain.unwrap_or_default(),
                        range.unwrap_or_default()
                    )
                })
                .collect();
            let names: Vec<String> = entities
                .iter()
                .map(|e| format!("{} ({})", e.name, e.class))
                .collect();
            format!(
                "Properties: {}.\nEntities: {}.\nList every relation the text states between \
                 these entities, naming subject and object exactly as listed.\n\nText:\n{text}",
                properties.join(", "),
                names.join("; ")
            )
        }
    }
}

/// The JSON schema the output must follow (strict: every field required, nothing else).
pub fn output_schema(call: &Call<'_>) -> Value {
    match call.task {
        Task::Mentions { .. } => {
            let classes: Vec<&str> = call
                .ontology
                .classes
                .iter()
                .map(|c| c.name.as_str())
                .collect();
            json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["mentions"],
                "properties": {"mentions": {"type": "array", "items": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["text", "type"],
                    "properties": {
                        "text": {"type": "string"},
                        "type": {"type": "string", "enum": classes},
                    },
                }}},
            })
        }
        Task::Relations { entities, .. } => {
            let properties: Vec<&str> = call
                .ontology
                .properties
                .iter()
                .map(|p| p.name.as_str())
                .collect();
            let names: Vec<&str> = entities.iter().map(|e| e.name.as_str()).collect();
            json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["relations"],
                "properties": {"relations": {"type": "array", "items": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["subject", "predicate", "object"],
                    "properties": {
                        "subject": {"type": "string", "enum": names},
                        "predicate": {"type": "string", "enum": properties},
                        "object": {"type": "string", "enum": names},
                    },
                }}},
            })
        }
    }
}

/// Validates a provider's JSON against the task: the shape, and that every class,
/// property and entity named exists.
pub fn parse_output(call: &Call<'_>, value: &Value) -> Result<Output, ProviderError> {
    let invalid = |m: String| ProviderError::InvalidOutput(m);
    match call.task {
        Task::Mentions { .. } => {
            let mentions: Vec<Mention> =
                serde_json::from_value(value.get("mentions").cloned().unwrap_or(Value::Null))
                    .map_err(|e| invalid(format!("`mentions`: {e}")))?;
            for m in &mentions {
                if call.ontology.class(&m.class).is_none() {
                    return Err(invalid(format!("unknown class `{}`", m.class)));
                }
            }
            Ok(Output::Mentions(mentions))
        }
        Task::Relations { entities, .. } => {
            let relations: Vec<StatedRelation> =
                serde_json::from_value(value.get("relations").cloned().unwrap_or(Value::Null))
                    .map_err(|e| invalid(format!("`relations`: {e}")))?;
            let known = |name: &str| entities.iter().any(|e| e.name == name);
            for r in &relations {
                if call.ontology.property(&r.predicate).is_none() {
                    return Err(invalid(format!("unknown property `{}`", r.predicate)));
                }
                if !known(&r.subject) || !known(&r.object) {
                    return Err(invalid(format!(
                        "relation between unknown entities `{}` and `{}`",
                        r.subject, r.object
                    )));
                }
            }
            Ok(Output::Relations(relations))
        }
    }
}

/// The `Retry-After` header (seconds) of a response, if any.
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| *s >= 0.0)
        .map(Duration::from_secs_f64)
}

/// Maps a non-2xx answer to a [`ProviderError`] (429 rate limited, 5xx and 529
/// unavailable, other 4xx rejected), with the provider's error message.
pub(crate) fn status_error(
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &str,
) -> ProviderError {
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(256).collect());
    let retry_after = retry_after(headers);
    match status.as_u16() {
        429 => ProviderError::RateLimited {
            retry_after,
            message,
        },
        408 | 500..=599 => ProviderError::Unavailable {
            status: Some(status.as_u16()),
            message,
            retry_after,
        },
        code => ProviderError::Rejected {
            status: code,
            message,
        },
    }
}

/// Maps a reqwest failure (no answer) to a [`ProviderError`].
pub(crate) fn transport_error(error: &reqwest::Error, timeout: Duration) -> ProviderError {
    if error.is_timeout() {
        ProviderError::Timeout(timeout)
    } else {
        ProviderError::Unavailable {
            status: None,
            message: error.to_string(),
            retry_after: None,
        }
    }
}
