//! The per-tenant history: a table the notification system creates itself
//! (`shoal_notifications`, [`SCHEMA`], applied by `shoal migrate` after the runtime's
//! migrations).
//!
//! Why a table and not the entity's state: the runtime writes a `persist_state` entity's
//! whole state with every completion, so a history of 10,000 events kept in the state would
//! be rewritten (as one JSONB value) on every publish. Here a publish inserts one row; the
//! entity's state holds only the next sequence number, committed with the completion.
//!
//! Invariants: rows of one tenant are written by its notification entity alone, one
//! message at a time, in sequence order; a replayed publish writes the same `(tenant, seq)`
//! with the same content, so `ON CONFLICT DO NOTHING` makes the insert idempotent. Readers
//! (the gateways) see a prefix of the sequence: no reader ever sees `seq` without every
//! kept `seq' < seq`. Retention: rows past the count are deleted by the entity as it
//! publishes; rows past the age are never read (the age filter is part of every read) and
//! deleted on the entity's next prune.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::Tenant;

/// The history table and its index (idempotent).
pub const SCHEMA: &[&str] = &["CREATE TABLE IF NOT EXISTS shoal_notifications (
        cluster text NOT NULL,
        tenant text NOT NULL,
        seq bigint NOT NULL,
        topic text NOT NULL,
        data jsonb NOT NULL,
        published_at timestamptz NOT NULL,
        PRIMARY KEY (cluster, tenant, seq)
    )"];

/// Creates the history table.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::Error> {
    for statement in SCHEMA {
        sqlx::query(*statement).execute(pool).await?;
    }
    Ok(())
}

/// One event of a tenant's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The tenant.
    pub tenant: String,
    /// Its place in the tenant's stream (1, 2, …).
    pub seq: u64,
    /// The topic (the SSE `event:` field).
    pub topic: String,
    /// The payload (the SSE `data:` field, as compact JSON).
    pub data: serde_json::Value,
    /// When the entity gave it its number.
    pub published_at: DateTime<Utc>,
}

/// Where the history is: the cluster's database, and how long it keeps events.
#[derive(Debug, Clone)]
pub struct History {
    pool: PgPool,
    cluster: String,
    max_age: Duration,
}

/// What a subscriber needs to know before reading: the newest kept event, and the oldest
/// still kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The oldest kept seq (`None`: nothing kept).
    pub oldest: Option<u64>,
    /// The newest seq (0: nothing ever kept).
    pub newest: u64,
}

fn to_i64(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn to_u64(seq: i64) -> u64 {
    u64::try_from(seq).unwrap_or(0)
}

impl History {
    /// The history of `cluster` in `pool`'s database; events older than `max_age` count
    /// as gone.
    pub fn new(pool: PgPool, cluster: impl Into<String>, max_age: Duration) -> Self {
        Self {
            pool,
            cluster: cluster.into(),
            max_age,
        }
    }

    fn max_age_secs(&self) -> f64 {
        self.max_age.as_secs_f64()
    }

    /// Stores `event` (a replay of the same event is a no-op).
    pub async fn insert(&self, event: &Event) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO shoal_notifications (cluster, tenant, seq, topic, data, published_at)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(&self.cluster)
        .bind(&event.tenant)
        .bind(to_i64(event.seq))
        .bind(&event.topic)
        .bind(&event.data)
        .bind(event.published_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deletes the tenant's events at or below `seq - max_events` and those past the age.
    pub async fn prune(
        &self,
        tenant: &Tenant,
        newest: u64,
        max_events: u64,
    ) -> Result<u64, sqlx::Error> {
        let below = newest.saturating_sub(max_events);
        let done = sqlx::query(
            "DELETE FROM shoal_notifications WHERE cluster = $1 AND tenant = $2
               AND (seq <= $3 OR published_at < now() - make_interval(secs => $4))",
        )
        .bind(&self.cluster)
        .bind(tenant.as_str())
        .bind(to_i64(below))
        .bind(self.max_age_secs())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// The newest seq the tenant ever kept (0 for none): the entity's next number after a
    /// reset of its state would start past it.
    pub async fn newest(&self, tenant: &Tenant) -> Result<u64, sqlx::Error> {
        let newest: Option<i64> = sqlx::query_scalar(
            "SELECT max(seq) FROM shoal_notifications WHERE cluster = $1 AND tenant = $2",
        )
        .bind(&self.cluster)
        .bind(tenant.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok(newest.map_or(0, to_u64))
    }

    /// The oldest kept and the newest seq of `tenant`.
    pub async fn bounds(&self, tenant: &Tenant) -> Result<Bounds, sqlx::Error> {
        let (oldest, newest): (Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT min(seq) FILTER (WHERE published_at >= now() - make_interval(secs => $3)),
                    max(seq)
               FROM shoal_notifications WHERE cluster = $1 AND tenant = $2",
        )
        .bind(&self.cluster)
        .bind(tenant.as_str())
        .bind(self.max_age_secs())
        .fetch_one(&self.pool)
        .await?;
        Ok(Bounds {
            oldest: oldest.map(to_u64),
            newest: newest.map_or(0, to_u64),
        })
    }

    /// Up to `limit` kept events of `tenant` after `after`, up to `until` (inclusive), in
    /// order.
    pub async fn read(
        &self,
        tenant: &Tenant,
        after: u64,
        until: u64,
        limit: u32,
    ) -> Result<Vec<Event>, sqlx::Error> {
        let rows: Vec<(i64, String, serde_json::Value, DateTime<Utc>)> = sqlx::query_as(
            "SELECT seq, topic, data, published_at FROM shoal_notifications
              WHERE cluster = $1 AND tenant = $2 AND seq > $3 AND seq <= $4
                AND published_at >= now() - make_interval(secs => $5)
              ORDER BY seq LIMIT $6",
        )
        .bind(&self.cluster)
        .bind(tenant.as_str())
        .bind(to_i64(after))
        .bind(to_i64(until))
        .bind(self.max_age_secs())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(seq, topic, data, published_at)| Event {
                tenant: tenant.to_string(),
                seq: to_u64(seq),
                topic,
                data,
                published_at,
            })
            .collect())
    }
}
