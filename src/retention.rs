//! Retention: the `shoal-retention` singleton removes processed messages and their replies
//! once they are older than `retention.period`, and publishes the tables' sizes.
//!
//! A pass removes old rows in batches of `batch-size` (one short statement each, walking
//! the primary key from its oldest end: see `message_storage/queries/purge.sql`), pausing
//! `batch-pause` between batches so the hot path never waits behind it, until a batch comes
//! back short; then it sleeps `interval`. Unprocessed messages are never removed. Running on
//! exactly one runner keeps two cleaners from contending for the same rows. A failed pass
//! is logged and retried on the next interval.

use std::sync::Arc;

use chrono::Utc;

use crate::config::RetentionConfig;
use crate::message_storage::{MessageStorage, MessageStorageError};
use crate::singleton::{Singleton, SingletonContext};

/// The singleton's name (its shard is `shard_of` this).
pub const SINGLETON_NAME: &str = "shoal-retention";

/// The retention singleton over `storage`.
pub fn singleton(storage: Arc<dyn MessageStorage>, config: RetentionConfig) -> Singleton {
    Singleton::new(SINGLETON_NAME, move |ctx| {
        run(ctx, storage.clone(), config.clone())
    })
}

async fn run(ctx: SingletonContext, storage: Arc<dyn MessageStorage>, config: RetentionConfig) {
    tracing::info!(period = ?config.period, "retention started");
    loop {
        match pass(&ctx, storage.as_ref(), &config).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "retention removed old processed messages"),
            Err(error) => tracing::warn!(%error, "retention pass failed; retrying next interval"),
        }
        match storage.stats().await {
            Ok(stats) => crate::metrics::storage_stats(&stats),
            Err(error) => tracing::warn!(%error, "could not read storage stats"),
        }
        if !ctx.pause(config.interval).await {
            return;
        }
    }
}

/// Removes everything processed before the window, batch by batch; how many went.
async fn pass(
    ctx: &SingletonContext,
    storage: &dyn MessageStorage,
    config: &RetentionConfig,
) -> Result<u64, MessageStorageError> {
    let period = chrono::TimeDelta::from_std(config.period).unwrap_or(chrono::TimeDelta::MAX);
    let before = Utc::now()
        .checked_sub_signed(period)
        .unwrap_or(chrono::DateTime::UNIX_EPOCH);
    let mut total = 0;
    while ctx.is_leader() {
        let removed = storage.purge(before, config.batch_size).await?;
        total += removed;
        crate::metrics::retention_purged(removed);
        if removed < config.batch_size as u64 {
            break;
        }
        if !ctx.pause(config.batch_pause).await {
            break;
        }
    }
    Ok(total)
}
