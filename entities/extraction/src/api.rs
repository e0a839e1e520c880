//! What the extraction routes share, below both `routes` and `sse`: the API's state
//! ([`ExtractionApi`], each handler's `Extension`), the tenant check every read by id makes
//! ([`may_read`]), and the parsing of a path id ([`parse_id`]).

use std::collections::BTreeMap;

use serde_json::Value;
use shoal::gateway::ApiError;
use shoal::redis::cache::Cache;
use shoal_notifications::Tenant;

use super::config::ExtractionConfig;
use super::journal::Journal;
use super::model::ExtractionId;
use super::ontology::Ontologies;
use super::watch::JournalWatch;

/// What the routes need.
#[derive(Debug, Clone)]
pub struct ExtractionApi {
    /// The ontologies (to validate `ontology_id` and pin its version).
    pub ontologies: Ontologies,
    /// `[extraction]`.
    pub config: ExtractionConfig,
    /// Each provider's default model.
    pub models: BTreeMap<String, String>,
    /// The journal and result store.
    pub journal: Option<Journal>,
    /// The Redis result cache (none without Redis).
    pub cache: Option<Cache<Value>>,
    /// When the journal's readers on this gateway look again.
    pub watch: JournalWatch,
}

/// Whether `caller` may read an extraction of `owner`: one of its own tenant; any for a
/// caller without a tenant (auth off, no `X-Tenant-Id`: as on the job routes) or with
/// `[extraction] shared-cache`.
pub(crate) fn may_read(api: &ExtractionApi, caller: Option<&Tenant>, owner: Option<&str>) -> bool {
    api.config.shared_cache || caller.is_none_or(|caller| owner == Some(caller.as_str()))
}

/// Parses a path id.
pub(crate) fn parse_id(id: &str) -> Result<ExtractionId, ApiError> {
    ExtractionId::parse(id).ok_or_else(|| {
        ApiError::bad_path_id(
            "id",
            format!("`{id}` is not an extraction id (`ex-` and 32 hex digits)"),
        )
    })
}
