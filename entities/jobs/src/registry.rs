//! [`JobRegistry`]: the job types a node knows, by name, behind an erased interface so the
//! job entity and the routes work with JSON payloads and outputs.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Deserialize as _;

use super::handler::{JobContext, JobError, JobHandler, JobOptions};

/// Longest job type name.
pub const MAX_TYPE_LEN: usize = 64;

/// Why a job type could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobRegistryError {
    /// The name is empty, too long or has characters other than letters, digits, `-`, `_`
    /// and `.`.
    #[error("job type name `{0}` must be 1–64 letters, digits, `-`, `_` or `.`")]
    InvalidType(String),
    /// Two handlers claim the same name.
    #[error("job type `{0}` is registered twice")]
    Duplicate(String),
    /// The options make no sense (for example `max_attempts` 0).
    #[error("job type `{name}`: {problem}")]
    InvalidOptions {
        /// The type.
        name: String,
        /// What is wrong.
        problem: String,
    },
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A handler seen through JSON.
pub(crate) trait ErasedJob: Send + Sync {
    fn options(&self) -> JobOptions;
    /// Checks that `payload` decodes as the handler's payload (the error names the field).
    fn check(&self, payload: &serde_json::Value) -> Result<(), String>;
    fn run<'a>(
        &'a self,
        ctx: &'a JobContext,
        payload: serde_json::Value,
    ) -> BoxFuture<'a, Result<serde_json::Value, JobError>>;
}

struct Typed<H>(H);

impl<H: JobHandler> ErasedJob for Typed<H> {
    fn options(&self) -> JobOptions {
        self.0.options()
    }

    fn check(&self, payload: &serde_json::Value) -> Result<(), String> {
        let payload = H::Payload::deserialize(payload).map_err(|e| e.to_string())?;
        self.0.check(&payload)
    }

    fn run<'a>(
        &'a self,
        ctx: &'a JobContext,
        payload: serde_json::Value,
    ) -> BoxFuture<'a, Result<serde_json::Value, JobError>> {
        Box::pin(async move {
            let payload: H::Payload = serde_json::from_value(payload)
                .map_err(|e| JobError::permanent(format!("payload does not decode: {e}")))?;
            let output = self.0.run(ctx, payload).await?;
            serde_json::to_value(output)
                .map_err(|e| JobError::permanent(format!("output does not encode: {e}")))
        })
    }
}

/// What one job may ask for at most, whoever enqueues it (`[jobs] max-attempts-limit`,
/// `min-backoff`): `POST /jobs` refuses more (400 naming the field), and the `job` entity
/// clamps a job enqueued from Rust to the same bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    /// The most attempts one budget may allow.
    pub max_attempts: u32,
    /// The shortest wait between attempts a job's own backoff may ask for.
    pub min_backoff: std::time::Duration,
}

impl Default for JobLimits {
    fn default() -> Self {
        Self {
            max_attempts: 100,
            min_backoff: std::time::Duration::from_millis(100),
        }
    }
}

/// The job types of a node.
#[derive(Clone, Default)]
pub struct JobRegistry {
    handlers: HashMap<&'static str, Arc<dyn ErasedJob>>,
    limits: JobLimits,
}

impl std::fmt::Debug for JobRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.handlers.keys().collect();
        names.sort();
        f.debug_struct("JobRegistry")
            .field("types", &names)
            .finish()
    }
}

impl JobRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a job type, validating its name and options.
    pub fn register<H: JobHandler>(&mut self, handler: H) -> Result<&mut Self, JobRegistryError> {
        let name = H::TYPE;
        if !valid_type(name) {
            return Err(JobRegistryError::InvalidType(name.to_owned()));
        }
        if self.handlers.contains_key(name) {
            return Err(JobRegistryError::Duplicate(name.to_owned()));
        }
        check_options(name, &handler.options())?;
        self.handlers.insert(name, Arc::new(Typed(handler)));
        Ok(self)
    }

    /// Sets what one job may ask for at most.
    pub fn set_limits(&mut self, limits: JobLimits) -> &mut Self {
        self.limits = limits;
        self
    }

    /// What one job may ask for at most.
    pub fn limits(&self) -> JobLimits {
        self.limits
    }

    /// The registered type names, sorted.
    pub fn types(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.handlers.keys().copied().collect();
        names.sort_unstable();
        names
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Arc<dyn ErasedJob>> {
        self.handlers.get(name)
    }
}

/// Whether `name` is a valid job type name.
pub fn valid_type(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TYPE_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn check_options(name: &str, options: &JobOptions) -> Result<(), JobRegistryError> {
    let problem = if options.max_attempts == 0 {
        Some("max_attempts must be at least 1")
    } else if options.timeout.is_zero() {
        Some("timeout must be positive")
    } else if options.concurrency == Some(0) {
        Some("concurrency must be at least 1")
    } else if options.backoff.first > options.backoff.max {
        Some("backoff.first must not exceed backoff.max")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(JobRegistryError::InvalidOptions {
            name: name.to_owned(),
            problem: problem.to_owned(),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostic::{Flaky, Noop};

    struct Named<const BAD: bool>;

    impl JobHandler for Named<true> {
        const TYPE: &'static str = "has space";
        type Payload = ();
        type Output = ();
        async fn run(&self, _ctx: &JobContext, _payload: ()) -> Result<(), JobError> {
            Ok(())
        }
    }

    #[test]
    fn names_and_duplicates_are_refused() {
        let mut registry = JobRegistry::new();
        assert!(registry.register(Flaky).is_ok());
        assert_eq!(
            registry.register(Flaky).err(),
            Some(JobRegistryError::Duplicate("diag.flaky".to_owned()))
        );
        assert!(matches!(
            registry.register(Named::<true>),
            Err(JobRegistryError::InvalidType(_))
        ));
        assert!(registry.register(Noop).is_ok());
        assert_eq!(registry.types(), ["diag.flaky", "diag.noop"]);
    }

    #[test]
    fn payloads_are_checked_against_the_handler_payload() {
        let mut registry = JobRegistry::new();
        let _ = registry.register(Flaky);
        let flaky = registry.get("diag.flaky").map(Arc::clone);
        let flaky = flaky
            .as_deref()
            .map(|h| h.check(&serde_json::json!({"fail_times": "x"})));
        assert!(matches!(flaky, Some(Err(message)) if message.contains("invalid type")));
    }
}
