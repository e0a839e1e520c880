//! The extraction's metrics (exported with the node's on `/metrics`), what the service's
//! SLOs alert on:
//!
//! - `shoal_extractions_total{state}`: extractions reaching `started`, `completed`,
//!   `failed` (by kind: `failed_provider`, …).
//! - `shoal_extraction_stage_seconds{stage}`: each stage's run (resumed ones excluded).
//! - `shoal_extraction_provider_calls_total{provider, outcome}` and
//!   `shoal_extraction_tokens_total{provider, kind}` (`input`, `output`).
//! - `shoal_extraction_limit_wait_seconds{provider}`: from a stage's first refusal by a
//!   provider limit to its admission (SLO: p99 < 5 s); `shoal_extraction_limited_total`.
//! - `shoal_extraction_cache_total{result}` (`hit_redis`, `hit_postgres`, `miss`; SLO: hit
//!   rate > 70 %) at the gateway, and `shoal_extraction_requests_total{outcome}` (`new`,
//!   `dedup`) at the entity (SLO: dedup success > 95 %: identical requests meeting one run).
//! - `shoal_extraction_ontology_reloads_total{outcome}` (`unchanged`, `changed`, `failed`:
//!   module `ontology`) and `shoal_extraction_pruned_total{table}` (module `prune`).

use std::time::Duration;

use super::model::Stage;

pub(crate) fn extraction(state: &str) {
    metrics::counter!("shoal_extractions_total", "state" => state.to_owned()).increment(1);
}

pub(crate) fn stage_finished(stage: Stage, took: Duration) {
    metrics::histogram!("shoal_extraction_stage_seconds", "stage" => stage.name())
        .record(took.as_secs_f64());
}

pub(crate) fn provider_call(provider: &str, outcome: &'static str, input: u64, output: u64) {
    metrics::counter!("shoal_extraction_provider_calls_total", "provider" => provider.to_owned(), "outcome" => outcome)
        .increment(1);
    metrics::counter!("shoal_extraction_tokens_total", "provider" => provider.to_owned(), "kind" => "input")
        .increment(input);
    metrics::counter!("shoal_extraction_tokens_total", "provider" => provider.to_owned(), "kind" => "output")
        .increment(output);
}

pub(crate) fn limited(provider: &str) {
    metrics::counter!("shoal_extraction_limited_total", "provider" => provider.to_owned())
        .increment(1);
}

pub(crate) fn limit_wait(provider: &str, waited: Duration) {
    metrics::histogram!("shoal_extraction_limit_wait_seconds", "provider" => provider.to_owned())
        .record(waited.as_secs_f64());
}

pub(crate) fn cache(result: &'static str) {
    metrics::counter!("shoal_extraction_cache_total", "result" => result).increment(1);
}

pub(crate) fn request(outcome: &'static str) {
    metrics::counter!("shoal_extraction_requests_total", "outcome" => outcome).increment(1);
}
