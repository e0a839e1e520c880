//! Listing jobs: `GET /jobs?state=&type=&limit=&cursor=`, indexed and paged.
//!
//! The job record is the `job` entity's state, a JSONB row of the runtime's
//! `shoal_entity_state`, committed with each completion: so the listing reads that row
//! (what it shows is exactly what the job committed) through partial expression indexes
//! the job system creates itself (`shoal migrate` applies [`SCHEMA`] after the runtime's
//! migrations; the runtime knows nothing of them). Pages are newest first by job id (a
//! uuid v7, so by creation time); the cursor is the last id of a page. A job whose attempt
//! is running shows its stored status (`queued` or `retrying`): `running` is only in the
//! live view of `GET /jobs/{id}`.

use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres, QueryBuilder};
use utoipa::{IntoParams, ToSchema};

use super::record::JobView;

/// The job system's indexes on the runtime's state table (idempotent).
pub const SCHEMA: &[&str] = &[
    "CREATE INDEX IF NOT EXISTS shoal_jobs_by_status ON shoal_entity_state
        (cluster, (state->>'status'), entity_id) WHERE entity_type = 'job'",
    "CREATE INDEX IF NOT EXISTS shoal_jobs_by_type ON shoal_entity_state
        (cluster, (state->>'type'), entity_id) WHERE entity_type = 'job'",
    "CREATE INDEX IF NOT EXISTS shoal_jobs_by_type_status ON shoal_entity_state
        (cluster, (state->>'type'), (state->>'status'), entity_id) WHERE entity_type = 'job'",
];

/// Largest page.
pub const MAX_LIMIT: u32 = 500;
/// Page size when none is asked for.
pub const DEFAULT_LIMIT: u32 = 50;

/// Creates the job system's indexes.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::Error> {
    for statement in SCHEMA.iter().chain(super::sweep::SCHEMA) {
        sqlx::query(*statement).execute(pool).await?;
    }
    Ok(())
}

/// What to list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only jobs in this status (`scheduled`, `queued`, `retrying`, `succeeded`, `dead`,
    /// `cancelled`).
    pub state: Option<String>,
    /// Only jobs of this type.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub job_type: Option<String>,
    /// Page size (1–500, default 50).
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One page of jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobPage {
    /// Newest first.
    pub jobs: Vec<JobView>,
    /// Pass as `cursor` for the next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The listing's SQL for `query` in `cluster` (only `tenant`'s jobs, if given), fetching
/// `limit + 1` rows.
pub fn query(
    cluster: &str,
    tenant: Option<&str>,
    query: &ListQuery,
    limit: u32,
) -> QueryBuilder<Postgres> {
    let mut sql = QueryBuilder::new(
        "SELECT entity_id, state FROM shoal_entity_state WHERE entity_type = 'job' AND cluster = ",
    );
    sql.push_bind(cluster.to_owned());
    if let Some(state) = &query.state {
        sql.push(" AND state->>'status' = ")
            .push_bind(state.clone());
    }
    if let Some(job_type) = &query.job_type {
        sql.push(" AND state->>'type' = ")
            .push_bind(job_type.clone());
    }
    if let Some(tenant) = tenant {
        sql.push(" AND state->>'tenant' = ")
            .push_bind(tenant.to_owned());
    }
    if let Some(cursor) = &query.cursor {
        // Ids are stored lowercase; a cursor may be written in either case.
        sql.push(" AND entity_id < ")
            .push_bind(cursor.to_ascii_lowercase());
    }
    sql.push(" ORDER BY entity_id DESC LIMIT ")
        .push_bind(i64::from(limit) + 1);
    sql
}

/// One page of the listing.
pub async fn list(
    pool: &PgPool,
    cluster: &str,
    tenant: Option<&str>,
    filter: &ListQuery,
) -> Result<JobPage, sqlx::Error> {
    let limit = filter.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let rows: Vec<(String, sqlx::types::Json<JobView>)> = query(cluster, tenant, filter, limit)
        .build_query_as()
        .fetch_all(pool)
        .await?;
    let more = rows.len() > limit as usize;
    let jobs: Vec<JobView> = rows
        .into_iter()
        .take(limit as usize)
        .map(|(_, state)| state.0)
        .collect();
    let next_cursor = more
        .then(|| jobs.last().map(|job| job.id.clone()))
        .flatten();
    Ok(JobPage { jobs, next_cursor })
}
