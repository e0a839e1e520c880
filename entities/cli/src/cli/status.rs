//! `shoal status`.

use std::sync::Arc;

use clap::Args;
use shoal::config::{ConfigLoader, ShoalConfig};
use shoal::runner_storage::RunnerStorage;
use shoal::runner_storage::postgres::{LockSessionSettings, PgRunnerStorage};
use shoal::status::ClusterStatus;

use super::{ClusterArgs, DatabaseArgs};

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

impl StatusArgs {
    pub(crate) fn apply(&self, loader: ConfigLoader) -> ConfigLoader {
        loader
            .set("database.url", self.db.database_url.clone())
            .set("cluster.name", self.cluster.cluster.clone())
    }
}

/// Reads the cluster's status from the database.
pub(crate) async fn read(config: &ShoalConfig) -> anyhow::Result<ClusterStatus> {
    let pool = super::connect(config).await?;
    let storage = Arc::new(PgRunnerStorage::new(
        pool.clone(),
        &config.database.url,
        config.cluster.name.clone(),
        LockSessionSettings::default(),
    )?);
    let snapshot = storage.snapshot().await?;
    pool.close().await;
    Ok(ClusterStatus::from_snapshot(
        config.cluster.name.clone(),
        config.sharding(),
        &snapshot,
    ))
}

pub(crate) async fn run(config: ShoalConfig, json: bool) -> anyhow::Result<()> {
    let status = read(&config).await?;
    if json {
        println!("{}", serde_json::to_string(&status)?);
    } else {
        print!("{}", status.to_text());
    }
    Ok(())
}
