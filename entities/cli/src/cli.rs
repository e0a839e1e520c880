//! Command-line interface. Every flag also has an environment variable; flags win over the
//! environment, which wins over the config file.

mod bench;
mod children;
mod cron;
mod dev;
mod drill;
mod gateway;
mod jobs;
mod runner;
mod signals;
mod status;
mod webhooks;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use shoal::config::{ApplicationConfig, ConfigLoader, ShoalConfig};

#[derive(Debug, Parser)]
#[command(
    name = "shoal",
    version,
    about = "A sharded actor cluster on PostgreSQL"
)]
pub(crate) struct Cli {
    /// Config file (TOML). Default: cluster-config/default.toml when it exists.
    #[arg(long, global = true, env = "SHOAL_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the database migrations.
    Migrate(DatabaseArgs),
    /// Run a runner: own shards and host their entities.
    Runner(runner::RunnerArgs),
    /// Start a whole local cluster: migrations, runners and a gateway (Ctrl-C stops it).
    Dev(dev::DevArgs),
    /// Run the HTTP gateway (routes requests to the owning runners).
    Gateway(gateway::GatewayArgs),
    /// Print the cluster's runners and shard ownership.
    Status(status::StatusArgs),
    /// Closed-loop load generator; prints JSON.
    Bench(bench::BenchArgs),
    /// Cluster cron.
    #[command(subcommand)]
    Cron(cron::CronCommand),
    /// Failover drills.
    #[command(subcommand)]
    Drill(drill::DrillCommand),
    /// Jobs through a gateway's HTTP API (JSON).
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Webhook endpoints disabled after a 410 (list, enable again).
    #[command(subcommand)]
    Webhooks(webhooks::WebhooksCommand),
}

/// `--database-url`, shared by most commands.
#[derive(Debug, Clone, Args)]
pub(crate) struct DatabaseArgs {
    /// PostgreSQL URL.
    #[arg(long, env = "SHOAL__DATABASE__URL")]
    pub(crate) database_url: Option<String>,
}

/// `--cluster`, shared by commands that address one cluster.
#[derive(Debug, Clone, Args)]
pub(crate) struct ClusterArgs {
    /// Cluster name.
    #[arg(long, env = "SHOAL__CLUSTER__NAME")]
    pub(crate) cluster: Option<String>,
}

impl Cli {
    /// Loads the config layers with this invocation's flags on top.
    fn load_config(
        &self,
        flags: impl FnOnce(ConfigLoader) -> ConfigLoader,
    ) -> anyhow::Result<ShoalConfig> {
        Ok(self.load_config_with_app(flags)?.0)
    }

    /// As [`Self::load_config`], with the application's sections (`[jobs]`) beside it: the
    /// runtime's loader leaves them to the application.
    fn load_config_with_app(
        &self,
        flags: impl FnOnce(ConfigLoader) -> ConfigLoader,
    ) -> anyhow::Result<(ShoalConfig, ApplicationConfig)> {
        let loader = ConfigLoader::new()
            .file_or_default(self.config.as_deref())
            .env(std::env::vars())
            .application_sections(APPLICATION_SECTIONS);
        Ok(flags(loader).load_with_application()?)
    }
}

/// Runners and gateways started on their own refuse the built-in cluster secret: anyone
/// who knows it (it is in the source) could deliver envelopes into a runner. `shoal dev`
/// and the drills give their children a random one.
fn refuse_default_secret(config: &ShoalConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.cluster.secret != shoal::config::DEFAULT_SECRET,
        "cluster.secret is the built-in default, which anyone can read in the source: set \
         your own (SHOAL__CLUSTER__SECRET, the same on every runner and gateway of the cluster)"
    );
    Ok(())
}

/// The configuration sections of the application (not the runtime's).
const APPLICATION_SECTIONS: &[&str] = &["jobs", "notifications", "extraction", "diagnostics"];

/// The application's sections, decoded and checked.
fn app_config(app: &ApplicationConfig) -> anyhow::Result<shoal_cli::AppConfig> {
    let notifications: shoal_notifications::NotificationsConfig = app.section("notifications")?;
    notifications.validate().map_err(anyhow::Error::msg)?;
    let jobs: shoal_jobs::JobsConfig = app.section("jobs")?;
    for (field, zero) in [
        ("sweep-interval", jobs.sweep_interval.is_zero()),
        ("gauge-interval", jobs.gauge_interval.is_zero()),
    ] {
        anyhow::ensure!(!zero, "jobs.{field}: must be above zero");
    }
    Ok(shoal_cli::AppConfig {
        jobs,
        notifications,
        extraction: app.section("extraction")?,
        diagnostics: app.section("diagnostics")?,
    })
}

pub(crate) async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Migrate(db) => {
            let config = cli.load_config(|l| l.set("database.url", db.database_url.clone()))?;
            migrate(&config).await
        }
        Command::Runner(args) => {
            let (config, app) = cli.load_config_with_app(|l| args.apply(l))?;
            refuse_default_secret(&config)?;
            runner::run(config, app_config(&app)?).await
        }
        Command::Dev(args) => {
            let config = cli.load_config(|l| args.apply(l))?;
            dev::run(args, config).await
        }
        Command::Gateway(args) => {
            let (config, app) = cli.load_config_with_app(|l| args.apply(l))?;
            refuse_default_secret(&config)?;
            gateway::run(config, app_config(&app)?).await
        }
        Command::Status(args) => {
            let config = cli.load_config(|l| args.apply(l))?;
            status::run(config, args.json).await
        }
        Command::Bench(args) => {
            let config = cli.load_config(|l| args.apply(l))?;
            bench::run(args, config).await
        }
        Command::Cron(command) => {
            let config = cli.load_config(|l| command.apply(l))?;
            command.run(config).await
        }
        Command::Drill(drill) => {
            let config = cli.load_config(|l| drill.apply(l))?;
            drill.run(config).await
        }
        Command::Jobs(jobs) => jobs.run().await,
        Command::Webhooks(command) => {
            let config = cli.load_config(|l| command.apply(l))?;
            command.run(config).await
        }
    }
}

async fn migrate(config: &ShoalConfig) -> anyhow::Result<()> {
    let pool = connect(config).await?;
    apply_migrations(&pool).await?;
    println!("migrations applied");
    Ok(())
}

/// The runtime's migrations, then the application's own schema (job indexes, extraction
/// tables, the notification history); `shoal migrate` and `shoal dev` both apply them.
pub(crate) async fn apply_migrations(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    shoal::MIGRATOR
        .run(pool)
        .await
        .context("applying migrations")?;
    shoal_jobs::listing::migrate(pool)
        .await
        .context("creating the job indexes")?;
    shoal_extraction::journal::migrate(pool)
        .await
        .context("creating the extraction tables")?;
    shoal_notifications::history::migrate(pool)
        .await
        .context("creating the notification history")?;
    Ok(())
}

/// Connects a small pool for one-shot commands.
pub(crate) async fn connect(config: &ShoalConfig) -> anyhow::Result<sqlx::PgPool> {
    let db = &config.database;
    shoal::runner_storage::postgres::connect_pool(&db.url, 2, db.connect_timeout)
        .await
        .with_context(|| format!("connecting to {}", redact(&db.url)))
}

/// A database URL without its password, for messages.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Sets up logging from the config (RUST_LOG wins).
pub(crate) fn init_logging(config: &ShoalConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match config.log.format {
        shoal::config::LogFormat::Json => builder.json().try_init(),
        shoal::config::LogFormat::Text => builder.try_init(),
    };
    if let Err(error) = result {
        eprintln!("warning: logging already initialized: {error}");
    }
}
