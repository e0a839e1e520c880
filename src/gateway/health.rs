//! The bodies of `/health` and `/ready` as the OpenAPI document describes them (the
//! handlers in `routes.rs` write the JSON; `openapi.rs` lists these schemas).

use serde_json::Value;

/// `/health`'s answer.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Describes the JSON the handler writes.
pub(crate) struct Health {
    /// Always `ok`.
    #[schema(pattern = "^ok$")]
    status: String,
}

/// `/ready`'s answer.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Describes the JSON the handler writes.
pub(crate) struct Readiness {
    /// Whether every check passed.
    ready: bool,
    /// Each check by name (`postgres`, `redis`, `breakers`, `shards_owned`, `backlog`).
    checks: std::collections::BTreeMap<String, ReadinessCheck>,
}

/// One readiness check.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Describes the JSON the handler writes.
pub(crate) struct ReadinessCheck {
    /// Whether it passed.
    ok: bool,
    /// What it found, when it passed.
    #[schema(value_type = Option<Value>)]
    detail: Option<Value>,
    /// Why it failed.
    error: Option<String>,
}
