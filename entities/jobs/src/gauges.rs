//! `shoal_jobs{type, status}`: how many jobs wait or are dead, per type — the gauges the
//! `shoal-job-gauges` singleton reads from the job rows every `[jobs] gauge-interval`
//! (default 15 s) and exports from the runner that leads it.
//!
//! Only the statuses that stay small are counted: `scheduled`, `queued`, `retrying` (the
//! backlog) and `dead` (the dead letters, bounded by the retention). Succeeded and
//! cancelled jobs are the bulk of the rows and are counted as they finish
//! (`shoal_jobs_finished_total`), never by a scan. The count reads the
//! `shoal_jobs_by_status` index. A runner that stops leading sets its gauges to zero, so
//! only the leader reports non-zero values (sum or max across runners both read right).

use std::collections::BTreeSet;
use std::time::Duration;

use shoal::singleton::{Singleton, SingletonContext};
use sqlx::PgPool;

/// The singleton's name.
pub const SINGLETON_NAME: &str = "shoal-job-gauges";

/// The statuses counted.
pub const COUNTED: [&str; 4] = ["scheduled", "queued", "retrying", "dead"];

/// The gauge singleton over the cluster's database.
pub fn singleton(pool: PgPool, cluster: String, interval: Duration) -> Singleton {
    Singleton::new(SINGLETON_NAME, move |ctx| {
        run(ctx, pool.clone(), cluster.clone(), interval)
    })
}

async fn run(ctx: SingletonContext, pool: PgPool, cluster: String, interval: Duration) {
    let mut exported: BTreeSet<(String, String)> = BTreeSet::new();
    loop {
        match count(&pool, &cluster).await {
            Ok(counts) => {
                let now: BTreeSet<_> = counts
                    .iter()
                    .map(|(t, s, _)| (t.clone(), s.clone()))
                    .collect();
                for (job_type, status) in exported.difference(&now) {
                    set(job_type, status, 0);
                }
                for (job_type, status, n) in &counts {
                    set(job_type, status, *n);
                }
                exported = now;
            }
            Err(error) => tracing::warn!(%error, "could not count jobs; retrying next interval"),
        }
        if !ctx.pause(interval).await {
            break;
        }
    }
    for (job_type, status) in &exported {
        set(job_type, status, 0);
    }
}

fn set(job_type: &str, status: &str, n: i64) {
    metrics::gauge!("shoal_jobs", "type" => job_type.to_owned(), "status" => status.to_owned())
        .set(n as f64);
}

async fn count(pool: &PgPool, cluster: &str) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT state->>'type', state->>'status', count(*)
           FROM shoal_entity_state
          WHERE cluster = $1 AND entity_type = 'job' AND state->>'status' = ANY($2)
          GROUP BY 1, 2",
    )
    .bind(cluster)
    .bind(&COUNTED[..])
    .fetch_all(pool)
    .await
}
