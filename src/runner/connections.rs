//! A runner's Postgres connections, counted: one pool shared by everything that is not the
//! ownership loop (message storage, cron, and the application's own tables), one control
//! connection for liveness reads, the lock session, and the peer watchers.
//!
//! The budget of one runner is `pool-max-connections + 1 (control) + 1 (lock session) +
//! min(watch-peers, N − 1)`; see the README for a cluster's.

use sqlx::PgPool;

use crate::config::ShoalConfig;
use crate::runner_storage::StorageError;
use crate::runner_storage::postgres::{ProcessTag, connect_pool_named};

/// Connections of the control pool: the ownership loop's liveness reads and epoch bumps,
/// which a burst of message work on the shared pool must never delay.
pub const CONTROL_CONNECTIONS: u32 = 1;

/// The connections one runner process opens besides its lock session and watchers, every
/// session named after the process's [`ProcessTag`] (so peers that find it hung end them
/// all, the application's too).
#[derive(Debug, Clone)]
pub struct RunnerConnections {
    tag: ProcessTag,
    pool: PgPool,
    control: PgPool,
}

impl RunnerConnections {
    /// Opens the pools of `[database]` (one connection each first, so a wrong URL reports
    /// its real cause).
    pub async fn connect(config: &ShoalConfig) -> Result<Self, StorageError> {
        let db = &config.database;
        let tag = ProcessTag::random();
        let app = tag.pool_application_name();
        let pool =
            connect_pool_named(&db.url, db.pool_max_connections, db.connect_timeout, &app).await?;
        let control =
            connect_pool_named(&db.url, CONTROL_CONNECTIONS, db.connect_timeout, &app).await?;
        Ok(Self { tag, pool, control })
    }

    /// The shared pool: give it to the application's entities, singletons and routes
    /// instead of opening pools of their own.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(super) fn tag(&self) -> &ProcessTag {
        &self.tag
    }

    pub(super) fn control(&self) -> &PgPool {
        &self.control
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
        self.control.close().await;
    }
}
