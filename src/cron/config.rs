//! The `[[cron]]` section: schedules as written in the configuration. The cron module owns
//! these types (the configuration tree embeds them and validates them with
//! [`super::Schedule::parse`]), so `cron` does not depend on `config`.

use serde::{Deserialize, Serialize};

/// What to do with instants that passed while no runner could fire them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MissedRunPolicy {
    /// Fire none of them.
    #[default]
    Skip,
    /// Fire the latest one, once.
    RunOnce,
    /// Fire each, up to `max-catch-up`.
    RunAll,
}

/// One `[[cron]]` schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CronScheduleConfig {
    /// Unique name; part of every instant's idempotency key `cron:<name>:<instant>`.
    pub name: String,
    /// Cron expression; a leading seconds field is allowed (`*/10 * * * * *`).
    pub expression: String,
    /// IANA time zone the expression is read in. Default `UTC`.
    #[serde(default = "utc")]
    pub time_zone: String,
    /// Missed-run policy. Default `skip`.
    #[serde(default)]
    pub policy: MissedRunPolicy,
    /// Most missed instants fired under `run-all`. Default 100.
    #[serde(default = "default_catch_up")]
    pub max_catch_up: usize,
    /// The message each instant sends.
    pub target: CronTargetConfig,
}

/// Where a schedule's messages go. String values `{{instant}}` and `{{name}}` in the
/// payload are replaced by the instant (RFC 3339) and the schedule's name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CronTargetConfig {
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub entity_id: String,
    /// Message name (must be a persisted message of the type).
    pub message: String,
    /// Message body. Default `{}`.
    #[serde(default = "empty_object")]
    pub payload: serde_json::Value,
}

fn utc() -> String {
    "UTC".to_owned()
}

fn default_catch_up() -> usize {
    100
}

fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}
