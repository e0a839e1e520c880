//! The `shoal-job-sweeper` singleton: deletes the state rows of pruned jobs and released
//! keys, so the job system's rows in `shoal_entity_state` stay bounded by what is kept.
//!
//! A job is pruned by its own timed `prune` message (`[jobs] retention` after it finished;
//! module `entity`), which releases its key and empties its record to the default (status
//! `new`). An emptied row reads exactly like a missing one (an entity without a row starts
//! from its default state), so deleting it changes nothing an entity or a reader can see;
//! the sweeper does that every `[jobs] sweep-interval` (default 5 min), in batches of
//! [`BATCH`] rows, each statement re-checking that the row is still empty. Released
//! `job-key` rows (`{"job_id": null}`) go the same way. `shoal_jobs_swept_total{entity_type}`
//! counts them.

use std::time::Duration;

use shoal::singleton::{Singleton, SingletonContext};
use sqlx::PgPool;

use super::record::JobView;

/// The singleton's name.
pub const SINGLETON_NAME: &str = "shoal-job-sweeper";

/// Rows one statement deletes at most.
pub const BATCH: i64 = 1000;

/// Pause between two statements of one pass.
const PAUSE: Duration = Duration::from_millis(50);

/// The index that finds released keys (created by `shoal migrate`; emptied jobs are found
/// through `shoal_jobs_by_status`).
pub const SCHEMA: &[&str] = &["CREATE INDEX IF NOT EXISTS shoal_job_keys_released
    ON shoal_entity_state (cluster, entity_id)
    WHERE entity_type = 'job-key' AND state = '{\"job_id\": null}'::jsonb"];

/// The sweeper over the cluster's database.
pub fn singleton(pool: PgPool, cluster: String, interval: Duration) -> Singleton {
    Singleton::new(SINGLETON_NAME, move |ctx| {
        run(ctx, pool.clone(), cluster.clone(), interval)
    })
}

async fn run(ctx: SingletonContext, pool: PgPool, cluster: String, interval: Duration) {
    let empty_job = serde_json::to_value(JobView::default()).unwrap_or_default();
    loop {
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
        tokio::select! {
            () = ctx.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// Emptied job rows: `$1` cluster, `$2` batch, `$3` the empty record.
const JOBS: &str = "DELETE FROM shoal_entity_state
  WHERE ctid = ANY(ARRAY(SELECT ctid FROM shoal_entity_state
                          WHERE cluster = $1 AND entity_type = 'job'
                            AND state->>'status' = 'new'
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
        tokio::select! {
            () = ctx.cancelled() => break,
            () = tokio::time::sleep(PAUSE) => {}
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::key::JobKeyState;

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
