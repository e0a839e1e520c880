//! The `shoal-job-sweeper` singleton: retention for the job system. Every `[jobs]
//! sweep-interval` (default 5 min) the runner leading it
//!
//! 1. **prunes** finished jobs (`succeeded`, `dead`, `cancelled`) whose `finished_at` is
//!    older than `[jobs] retention`: it sends each a persisted `prune {generation}`
//!    (idempotency key `prune:<generation>`, so a pass that meets a job again before its
//!    prune ran sends nothing new), and the job itself releases its key and empties its
//!    record. The entity stays the only writer of its state, and a job retried since then
//!    (a new generation) ignores the stale prune. Nothing is added to a job's own
//!    completions: an earlier design scheduled each job's prune as a timed message in the
//!    completion that finished it, and that extra row per job cost the hot path (same
//!    binary, one run each, `scripts/jobs-bench.sh`: enqueue→start p99 1,612 ms with it,
//!    102 ms without);
//! 2. **deletes** the emptied rows of pruned jobs and released `job-key`s
//!    (`{"job_id": null}`). An emptied row reads exactly like a missing one (an entity
//!    without a row starts from its default state), so this changes nothing an entity or a
//!    reader can see; each statement re-checks that the row is still empty.
//!
//! Both walk partial indexes in batches of [`BATCH`]. `shoal_jobs_pruned_total{type}`
//! (counted by the job as it prunes) and `shoal_jobs_swept_total{entity_type}` count them.

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use futures::StreamExt;
use shoal::client::Request;
use shoal::entity::EntityProtocol;
use shoal::ids::{EntityAddress, EntityId, EntityType};
use shoal::singleton::{Singleton, SingletonContext};
use sqlx::PgPool;

use super::record::JobView;

/// The singleton's name.
pub const SINGLETON_NAME: &str = "shoal-job-sweeper";

/// Rows one statement deletes at most.
pub const BATCH: i64 = 1000;

/// Pause between two statements of one pass.
const PAUSE: Duration = Duration::from_millis(50);

/// Prune messages in flight at once.
const SENDS_AT_ONCE: usize = 16;

/// The indexes that find finished jobs by age and released keys (created by `shoal
/// migrate`; emptied jobs are found through `shoal_jobs_by_status`). `finished_at` is
/// RFC 3339 in UTC, so its text sorts by time (to the second; a fraction may sort a
/// sub-second early or late).
pub const SCHEMA: &[&str] = &[
    "CREATE INDEX IF NOT EXISTS shoal_jobs_finished ON shoal_entity_state
        (cluster, (state->>'finished_at'))
        WHERE entity_type = 'job' AND state->>'status' IN ('succeeded', 'dead', 'cancelled')",
    "CREATE INDEX IF NOT EXISTS shoal_job_keys_released
        ON shoal_entity_state (cluster, entity_id)
        WHERE entity_type = 'job-key' AND state = '{\"job_id\": null}'::jsonb",
];

/// The sweeper over the cluster's database: prunes jobs finished more than `retention`
/// ago and deletes emptied rows, every `interval`.
pub fn singleton(
    pool: PgPool,
    cluster: String,
    retention: Duration,
    interval: Duration,
) -> Singleton {
    Singleton::new(SINGLETON_NAME, move |ctx| {
        run(ctx, pool.clone(), cluster.clone(), retention, interval)
    })
}

async fn run(
    ctx: SingletonContext,
    pool: PgPool,
    cluster: String,
    retention: Duration,
    interval: Duration,
) {
    let empty_job = serde_json::to_value(JobView::default()).unwrap_or_default();
    loop {
        match prune(&ctx, &pool, &cluster, retention).await {
            Ok(0) => {}
            Ok(sent) => tracing::info!(sent, "sent prune to jobs past the retention"),
            Err(error) => tracing::warn!(%error, "job pruning failed; retrying next interval"),
        }
        for (entity_type, statement) in [("job", JOBS), ("job-key", KEYS)] {
            match sweep(&ctx, &pool, &cluster, statement, &empty_job).await {
                Ok(0) => {}
                Ok(removed) => {
                    metrics::counter!("shoal_jobs_swept_total", "entity_type" => entity_type)
                        .increment(removed);
                    tracing::info!(entity_type, removed, "swept emptied job rows");
                }
                Err(error) => {
                    tracing::warn!(entity_type, %error, "job sweep failed; retrying next interval");
                }
            }
        }
        if !ctx.pause(interval).await {
            return;
        }
    }
}

/// Sends `prune` to every job finished before the retention, batch by batch; how many.
async fn prune(
    ctx: &SingletonContext,
    pool: &PgPool,
    cluster: &str,
    retention: Duration,
) -> anyhow::Result<u64> {
    let Some(client) = ctx.client() else {
        return Ok(0);
    };
    let keep = chrono::TimeDelta::from_std(retention).unwrap_or(chrono::TimeDelta::MAX);
    let before = Utc::now()
        .checked_sub_signed(keep)
        .unwrap_or(chrono::DateTime::UNIX_EPOCH)
        .to_rfc3339_opts(SecondsFormat::AutoSi, true);
    let job_type = EntityType::new(super::entity::Job::NAME)?;
    let mut after = (String::new(), String::new());
    let mut total = 0;
    while ctx.is_leader() {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT state->>'finished_at', entity_id,
                    COALESCE((state->>'generation')::bigint, 0)
               FROM shoal_entity_state
              WHERE cluster = $1 AND entity_type = 'job'
                AND state->>'status' IN ('succeeded', 'dead', 'cancelled')
                AND state->>'finished_at' < $2
                AND (state->>'finished_at', entity_id) > ($3, $4)
              ORDER BY state->>'finished_at', entity_id LIMIT $5",
        )
        .bind(cluster)
        .bind(&before)
        .bind(&after.0)
        .bind(&after.1)
        .bind(BATCH)
        .fetch_all(pool)
        .await?;
        let Some(last) = rows.last() else { break };
        after = (last.0.clone(), last.1.clone());
        let full = rows.len() as i64 == BATCH;
        let sends = rows.into_iter().map(|(_, id, generation)| {
            let job_type = job_type.clone();
            async move {
                let address = EntityAddress {
                    entity_type: job_type,
                    entity_id: EntityId::new(id)?,
                };
                let body = serde_json::json!({ "generation": generation });
                let request = Request::persisted(address, "prune", body)
                    .with_key(format!("prune:{generation}"));
                client.send(request).await?;
                anyhow::Ok(())
            }
        });
        let mut sent = futures::stream::iter(sends).buffer_unordered(SENDS_AT_ONCE);
        while let Some(result) = sent.next().await {
            match result {
                Ok(()) => total += 1,
                Err(error) => tracing::warn!(%error, "could not send a job its prune"),
            }
        }
        if !full {
            break;
        }
        if !ctx.pause(PAUSE).await {
            break;
        }
    }
    Ok(total)
}

/// Emptied job rows: `$1` cluster, `$2` batch, `$3` the empty record.
const JOBS: &str = "DELETE FROM shoal_entity_state
  WHERE ctid = ANY(ARRAY(SELECT ctid FROM shoal_entity_state
                          WHERE cluster = $1 AND entity_type = 'job'
                            AND state->>'status' = 'new' AND state = $3
                          LIMIT $2))
    AND entity_type = 'job' AND state = $3";

/// Released key rows: `$1` cluster, `$2` batch (`$3` unused).
const KEYS: &str = "DELETE FROM shoal_entity_state
  WHERE ctid = ANY(ARRAY(SELECT ctid FROM shoal_entity_state
                          WHERE cluster = $1 AND entity_type = 'job-key'
                            AND state = '{\"job_id\": null}'::jsonb
                          LIMIT $2))
    AND entity_type = 'job-key' AND state = '{\"job_id\": null}'::jsonb
    AND $3::jsonb IS NOT NULL";

async fn sweep(
    ctx: &SingletonContext,
    pool: &PgPool,
    cluster: &str,
    statement: &'static str,
    empty_job: &serde_json::Value,
) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    while ctx.is_leader() {
        let removed = sqlx::query(statement)
            .bind(cluster)
            .bind(BATCH)
            .bind(empty_job)
            .execute(pool)
            .await?
            .rows_affected();
        total += removed;
        if removed < BATCH as u64 {
            break;
        }
        if !ctx.pause(PAUSE).await {
            break;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::JobKeyState;

    #[test]
    fn a_released_key_is_the_row_the_sweeper_looks_for() {
        assert_eq!(
            serde_json::to_value(JobKeyState::default()).expect("encodes"),
            serde_json::json!({"job_id": null})
        );
        let empty = serde_json::to_value(JobView::default()).expect("encodes");
        assert_eq!(empty["status"], "new");
    }
}
