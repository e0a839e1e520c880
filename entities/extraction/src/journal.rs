//! The extraction's durable journal and result store, in Postgres (tables the extraction
//! creates itself in `shoal migrate`; the runtime knows nothing of them).
//!
//! - `shoal_extraction_events`: one row per event of an extraction, numbered `seq` from 1
//!   in the order they happened: `started`, `progress {stage, percent}` (one per finished
//!   stage, its row carrying the stage's output as the **checkpoint**), then `complete
//!   {result}` or `failed {error}`. Each event has a key unique per extraction
//!   (`g<generation>:stage:<name>`, …), so a handler that runs again appends nothing twice,
//!   and a stage whose checkpoint row exists is never run again. It is the audit trail and
//!   what `GET /extractions/{id}/events` serves.
//! - `shoal_extraction_chunks`: the provider's output for each chunk of a stage that calls
//!   it chunk by chunk (`entities`, `relations`), written as each call returns, so a stage
//!   that is cut short (a limit refusal, a retryable failure, a failover) resumes at its
//!   first unfinished chunk and never pays for a finished chunk twice. A stage's rows are
//!   removed once its checkpoint is in the journal.
//! - `shoal_extraction_results`: the durable copy of every finished result (the Redis cache
//!   holds it for 24 h in front of it).
//!
//! A `started` event and a result carry the extraction's tenant (`tenant`, NULL for a
//! caller without one), so a read by id is answered only to that tenant.
//! - `shoal_extraction_ontologies`: the Turtle of every ontology version a node offered,
//!   by id and version (content-addressed, shared by clusters), so a runner that never read
//!   a version a run pinned (it started after the file changed) loads it from here.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;

use super::ontology::Ontology;
use super::watch::JournalHints;

/// The tables (idempotent).
pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS shoal_extraction_events (
        cluster TEXT NOT NULL,
        extraction_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        key TEXT NOT NULL,
        kind TEXT NOT NULL,
        data JSONB NOT NULL,
        checkpoint JSONB,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (cluster, extraction_id, seq),
        UNIQUE (cluster, extraction_id, key)
    )",
    "CREATE TABLE IF NOT EXISTS shoal_extraction_chunks (
        cluster TEXT NOT NULL,
        extraction_id TEXT NOT NULL,
        generation INTEGER NOT NULL,
        stage TEXT NOT NULL,
        chunk INTEGER NOT NULL,
        output JSONB NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (cluster, extraction_id, generation, stage, chunk)
    )",
    "CREATE TABLE IF NOT EXISTS shoal_extraction_ontologies (
        ontology_id TEXT NOT NULL,
        version TEXT NOT NULL,
        source BYTEA NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (ontology_id, version)
    )",
    "CREATE TABLE IF NOT EXISTS shoal_extraction_results (
        cluster TEXT NOT NULL,
        extraction_id TEXT NOT NULL,
        result JSONB NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (cluster, extraction_id)
    )",
    // Whose extraction it is (NULL: a caller without a tenant), on its `started` events and
    // its result: what a read by id is checked against.
    "ALTER TABLE shoal_extraction_events ADD COLUMN IF NOT EXISTS tenant TEXT",
    "ALTER TABLE shoal_extraction_results ADD COLUMN IF NOT EXISTS tenant TEXT",
];

/// Creates the tables.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::Error> {
    for statement in SCHEMA.iter().chain(super::prune::SCHEMA) {
        sqlx::query(*statement).execute(pool).await?;
    }
    Ok(())
}

/// One journal event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// 1, 2, … per extraction.
    pub seq: i64,
    /// `started`, `progress`, `complete`, `failed`.
    pub kind: String,
    /// The event's data (what SSE sends).
    pub data: Value,
    /// When it was appended.
    pub created_at: DateTime<Utc>,
}

/// Where an extraction's latest run starts, and whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStart {
    /// The seq just before its `started` (where a stream without `Last-Event-ID` begins).
    pub before: i64,
    /// The extraction's tenant (`None`: a caller without one).
    pub tenant: Option<String>,
}

/// A stored result and whose it is.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResult {
    /// The result.
    pub result: Value,
    /// The extraction's tenant (`None`: a caller without one).
    pub tenant: Option<String>,
}

/// Whether the journal's storage failed (always worth retrying: the handler runs again).
#[derive(Debug, thiserror::Error)]
#[error("extraction journal: {0}")]
pub struct JournalError(#[from] sqlx::Error);

/// The journal and results of one cluster.
#[derive(Debug, Clone)]
pub struct Journal {
    pool: PgPool,
    cluster: String,
    hints: Option<JournalHints>,
}

impl Journal {
    /// The journal of `cluster` in `pool`'s database; with `hints`, each append wakes the
    /// extraction's readers on every gateway (module `watch`).
    pub fn new(pool: PgPool, cluster: &str, hints: Option<JournalHints>) -> Self {
        Self {
            pool,
            cluster: cluster.to_owned(),
            hints,
        }
    }

    /// Appends an event under `key` unless one is there already; returns the stored
    /// event's checkpoint (the earlier one's, if the key was taken).
    pub async fn append(
        &self,
        id: &str,
        key: &str,
        kind: &str,
        data: &Value,
        checkpoint: Option<&Value>,
    ) -> Result<Option<Value>, JournalError> {
        self.insert(id, key, kind, data, checkpoint, None).await
    }

    /// Appends a run's `started` event under `key`, naming the extraction's `tenant`.
    pub async fn append_started(
        &self,
        id: &str,
        key: &str,
        data: &Value,
        tenant: Option<&str>,
    ) -> Result<(), JournalError> {
        self.insert(id, key, "started", data, None, tenant).await?;
        Ok(())
    }

    async fn insert(
        &self,
        id: &str,
        key: &str,
        kind: &str,
        data: &Value,
        checkpoint: Option<&Value>,
        tenant: Option<&str>,
    ) -> Result<Option<Value>, JournalError> {
        let inserted = sqlx::query(
            "INSERT INTO shoal_extraction_events (cluster, extraction_id, seq, key, kind, data, checkpoint, tenant)
             SELECT $1, $2, COALESCE(MAX(seq), 0) + 1, $3, $4, $5, $6, $7
               FROM shoal_extraction_events WHERE cluster = $1 AND extraction_id = $2
             ON CONFLICT (cluster, extraction_id, key) DO NOTHING",
        )
        .bind(&self.cluster)
        .bind(id)
        .bind(key)
        .bind(kind)
        .bind(data)
        .bind(checkpoint)
        .bind(tenant)
        .execute(&self.pool)
        .await?;
        if let Some(hints) = &self.hints
            && inserted.rows_affected() > 0
        {
            hints.appended(id).await;
        }
        self.checkpoint(id, key).await
    }

    /// The checkpoint stored under `key`, if that event exists.
    pub async fn checkpoint(&self, id: &str, key: &str) -> Result<Option<Value>, JournalError> {
        let row: Option<(Option<Value>,)> = sqlx::query_as(
            "SELECT checkpoint FROM shoal_extraction_events
              WHERE cluster = $1 AND extraction_id = $2 AND key = $3",
        )
        .bind(&self.cluster)
        .bind(id)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|(c,)| c))
    }

    /// Whether an event exists under `key`.
    pub async fn has(&self, id: &str, key: &str) -> Result<bool, JournalError> {
        let row: Option<(i64,)> = sqlx::query_as(
            "SELECT seq FROM shoal_extraction_events
              WHERE cluster = $1 AND extraction_id = $2 AND key = $3",
        )
        .bind(&self.cluster)
        .bind(id)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// Up to `limit` events after `after`, in order.
    pub async fn after(
        &self,
        id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Event>, JournalError> {
        let rows: Vec<(i64, String, Value, DateTime<Utc>)> = sqlx::query_as(
            "SELECT seq, kind, data, created_at FROM shoal_extraction_events
              WHERE cluster = $1 AND extraction_id = $2 AND seq > $3
              ORDER BY seq LIMIT $4",
        )
        .bind(&self.cluster)
        .bind(id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(seq, kind, data, created_at)| Event {
                seq,
                kind,
                data,
                created_at,
            })
            .collect())
    }

    /// The latest run's start, or `None` when the extraction has no events.
    pub async fn latest_run_start(&self, id: &str) -> Result<Option<RunStart>, JournalError> {
        let row: Option<(i64, Option<String>)> = sqlx::query_as(
            "SELECT seq, tenant FROM shoal_extraction_events
              WHERE cluster = $1 AND extraction_id = $2 AND kind = 'started'
              ORDER BY seq DESC LIMIT 1",
        )
        .bind(&self.cluster)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(seq, tenant)| RunStart {
            before: seq - 1,
            tenant,
        }))
    }

    /// The stored outputs of `stage`'s chunks in run `generation`, by chunk index.
    pub async fn chunk_outputs(
        &self,
        id: &str,
        generation: u32,
        stage: &str,
    ) -> Result<BTreeMap<u32, Value>, JournalError> {
        let rows: Vec<(i32, Value)> = sqlx::query_as(
            "SELECT chunk, output FROM shoal_extraction_chunks
              WHERE cluster = $1 AND extraction_id = $2 AND generation = $3 AND stage = $4",
        )
        .bind(&self.cluster)
        .bind(id)
        .bind(generation as i32)
        .bind(stage)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(chunk, output)| (chunk as u32, output))
            .collect())
    }

    /// Stores one chunk's output (the first one stays).
    pub async fn put_chunk(
        &self,
        id: &str,
        generation: u32,
        stage: &str,
        chunk: u32,
        output: &Value,
    ) -> Result<(), JournalError> {
        sqlx::query(
            "INSERT INTO shoal_extraction_chunks (cluster, extraction_id, generation, stage, chunk, output)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(&self.cluster)
        .bind(id)
        .bind(generation as i32)
        .bind(stage)
        .bind(chunk as i32)
        .bind(output)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes `stage`'s chunk outputs (its checkpoint holds them now).
    pub async fn drop_chunks(
        &self,
        id: &str,
        generation: u32,
        stage: &str,
    ) -> Result<(), JournalError> {
        sqlx::query(
            "DELETE FROM shoal_extraction_chunks
              WHERE cluster = $1 AND extraction_id = $2 AND generation = $3 AND stage = $4",
        )
        .bind(&self.cluster)
        .bind(id)
        .bind(generation as i32)
        .bind(stage)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Stores an ontology version's Turtle (the first copy stays: same id and version, same
    /// bytes).
    pub async fn put_ontology(&self, ontology: &Ontology) -> Result<(), JournalError> {
        sqlx::query(
            "INSERT INTO shoal_extraction_ontologies (ontology_id, version, source)
             VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(&ontology.id)
        .bind(&ontology.version)
        .bind(&ontology.source[..])
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The stored Turtle of version `version` of ontology `id`.
    pub async fn ontology_source(
        &self,
        id: &str,
        version: &str,
    ) -> Result<Option<Vec<u8>>, JournalError> {
        let row: Option<(Vec<u8>,)> = sqlx::query_as(
            "SELECT source FROM shoal_extraction_ontologies WHERE ontology_id = $1 AND version = $2",
        )
        .bind(id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(source,)| source))
    }

    /// Stores a finished result of `tenant`'s extraction (the first one stays).
    pub async fn put_result(
        &self,
        id: &str,
        tenant: Option<&str>,
        result: &Value,
    ) -> Result<(), JournalError> {
        sqlx::query(
            "INSERT INTO shoal_extraction_results (cluster, extraction_id, result, tenant)
             VALUES ($1, $2, $3, $4) ON CONFLICT (cluster, extraction_id) DO NOTHING",
        )
        .bind(&self.cluster)
        .bind(id)
        .bind(result)
        .bind(tenant)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The stored result of `id`, if it finished.
    pub async fn result(&self, id: &str) -> Result<Option<StoredResult>, JournalError> {
        let row: Option<(Value, Option<String>)> = sqlx::query_as(
            "SELECT result, tenant FROM shoal_extraction_results
              WHERE cluster = $1 AND extraction_id = $2",
        )
        .bind(&self.cluster)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(result, tenant)| StoredResult { result, tenant }))
    }
}
