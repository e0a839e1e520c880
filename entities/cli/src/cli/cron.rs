//! `shoal cron list`.

use clap::Subcommand;
use shoal::config::{ConfigLoader, ShoalConfig};
use shoal::runner_storage::RunnerStorage;
use shoal::runner_storage::postgres::{LockSessionSettings, PgRunnerStorage};

use super::{ClusterArgs, DatabaseArgs};

#[derive(Debug, Subcommand)]
pub(crate) enum CronCommand {
    /// Each schedule with its last fired and next instant, policy and driving runner (JSON).
    List {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

impl CronCommand {
    pub(crate) fn apply(&self, loader: ConfigLoader) -> ConfigLoader {
        match self {
            Self::List { db, cluster } => loader
                .set("database.url", db.database_url.clone())
                .set("cluster.name", cluster.cluster.clone()),
        }
    }

    pub(crate) async fn run(&self, config: ShoalConfig) -> anyhow::Result<()> {
        let pool = super::connect(&config).await?;
        let schedules = shoal::cron::schedules(&config.cron).map_err(anyhow::Error::msg)?;
        let runners = PgRunnerStorage::new(
            pool.clone(),
            &config.database.url,
            config.cluster.name.clone(),
            LockSessionSettings::default(),
        )?;
        let snapshot = runners.snapshot().await?;
        let driver = snapshot
            .owners
            .get(&config.sharding().shard_of_key(shoal::cron::DRIVER))
            .copied();
        let store = shoal::cron::CronStore::new(pool.clone(), config.cluster.name.clone());
        let listing = shoal::cron::list(&schedules, &store, driver).await?;
        println!("{}", serde_json::to_string(&listing)?);
        pool.close().await;
        Ok(())
    }
}
