//! The `shoal-extraction-pruner` singleton: keeps the journal, the chunk outputs and the
//! durable results from growing without bound.
//!
//! Every `[extraction] prune-interval` (default 10 min) the runner leading it removes, in
//! batches of `prune-batch` rows (one short statement each, `prune-pause` apart):
//!
//! - the journal of every extraction whose **last** event is its end (`complete` or
//!   `failed`) and older than `journal-retention` (default 7 days). An extraction that is
//!   still running, or that ran again after an old end (a new generation), keeps every row;
//! - chunk outputs older than `journal-retention` (a stage's rows normally go when its
//!   checkpoint lands; these are what a crash between the two left);
//! - results older than `result-retention` (default 30 days): after that a request for the
//!   same inputs runs again. The Redis copy expires by itself (`[redis.cache]`).
//!
//! `shoal_extraction_pruned_total{table}` counts what went. A failed pass is logged and
//! retried on the next interval; running on one runner keeps two pruners off the same rows.

use std::time::Duration;

use chrono::Utc;
use shoal::singleton::{Singleton, SingletonContext};
use sqlx::PgPool;

use super::config::ExtractionConfig;

/// The singleton's name.
pub const SINGLETON_NAME: &str = "shoal-extraction-pruner";

/// The indexes the pruner reads (created by `shoal migrate` with the tables).
pub const SCHEMA: &[&str] = &[
    "CREATE INDEX IF NOT EXISTS shoal_extraction_events_ends
        ON shoal_extraction_events (cluster, created_at) WHERE kind IN ('complete', 'failed')",
    "CREATE INDEX IF NOT EXISTS shoal_extraction_chunks_age
        ON shoal_extraction_chunks (cluster, created_at)",
    "CREATE INDEX IF NOT EXISTS shoal_extraction_results_age
        ON shoal_extraction_results (cluster, created_at)",
];

/// Extractions whose journal one statement removes at most (each a handful of rows).
const ENDED_PER_BATCH_DIVISOR: i64 = 8;

/// What the pruner keeps and how it paces itself.
#[derive(Debug, Clone)]
struct Policy {
    journal: Duration,
    results: Duration,
    interval: Duration,
    batch: i64,
    pause: Duration,
}

/// The pruner over the cluster's database.
pub fn singleton(pool: PgPool, cluster: String, config: &ExtractionConfig) -> Singleton {
    let policy = Policy {
        journal: config.journal_retention,
        results: config.result_retention,
        interval: config.prune_interval,
        batch: i64::from(config.prune_batch),
        pause: config.prune_pause,
    };
    Singleton::new(SINGLETON_NAME, move |ctx| {
        run(ctx, pool.clone(), cluster.clone(), policy.clone())
    })
}

async fn run(ctx: SingletonContext, pool: PgPool, cluster: String, policy: Policy) {
    loop {
        for table in Table::ALL {
            match prune(&ctx, &pool, &cluster, &policy, table).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(table = table.name(), removed, "extraction pruner"),
                Err(error) => {
                    tracing::warn!(table = table.name(), %error, "extraction pruning failed; retrying next interval");
                }
            }
        }
        if !ctx.pause(policy.interval).await {
            return;
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Table {
    Events,
    Chunks,
    Results,
}

impl Table {
    const ALL: [Table; 3] = [Table::Events, Table::Chunks, Table::Results];

    fn name(self) -> &'static str {
        match self {
            Table::Events => "events",
            Table::Chunks => "chunks",
            Table::Results => "results",
        }
    }

    /// One batch: `$1` cluster, `$2` the cut-off, `$3` the batch size.
    fn statement(self) -> &'static str {
        match self {
            Table::Events => {
                "DELETE FROM shoal_extraction_events e
                  USING (SELECT o.extraction_id FROM shoal_extraction_events o
                          WHERE o.cluster = $1 AND o.kind IN ('complete', 'failed')
                            AND o.created_at < $2
                            AND NOT EXISTS (SELECT 1 FROM shoal_extraction_events n
                                             WHERE n.cluster = o.cluster
                                               AND n.extraction_id = o.extraction_id
                                               AND n.seq > o.seq)
                          LIMIT $3) ended
                  WHERE e.cluster = $1 AND e.extraction_id = ended.extraction_id"
            }
            Table::Chunks => {
                "DELETE FROM shoal_extraction_chunks
                  WHERE ctid = ANY(ARRAY(SELECT ctid FROM shoal_extraction_chunks
                                          WHERE cluster = $1 AND created_at < $2 LIMIT $3))"
            }
            Table::Results => {
                "DELETE FROM shoal_extraction_results
                  WHERE ctid = ANY(ARRAY(SELECT ctid FROM shoal_extraction_results
                                          WHERE cluster = $1 AND created_at < $2 LIMIT $3))"
            }
        }
    }
}

/// Removes `table`'s rows past their retention, batch by batch; how many went.
async fn prune(
    ctx: &SingletonContext,
    pool: &PgPool,
    cluster: &str,
    policy: &Policy,
    table: Table,
) -> Result<u64, sqlx::Error> {
    let (keep, limit) = match table {
        Table::Events => (
            policy.journal,
            (policy.batch / ENDED_PER_BATCH_DIVISOR).max(1),
        ),
        Table::Chunks => (policy.journal, policy.batch),
        Table::Results => (policy.results, policy.batch),
    };
    let keep = chrono::TimeDelta::from_std(keep).unwrap_or(chrono::TimeDelta::MAX);
    let before = Utc::now()
        .checked_sub_signed(keep)
        .unwrap_or(chrono::DateTime::UNIX_EPOCH);
    let mut total = 0;
    while ctx.is_leader() {
        let removed = sqlx::query(table.statement())
            .bind(cluster)
            .bind(before)
            .bind(limit)
            .execute(pool)
            .await?
            .rows_affected();
        total += removed;
        metrics::counter!("shoal_extraction_pruned_total", "table" => table.name())
            .increment(removed);
        // The journal's batch counts extractions, each several rows: stop when none were.
        if removed == 0 || (!matches!(table, Table::Events) && removed < limit as u64) {
            break;
        }
        if !ctx.pause(policy.pause).await {
            break;
        }
    }
    Ok(total)
}
