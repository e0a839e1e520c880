//! The cluster a drill runs against: one it was pointed at (`--gateway`) or one it starts
//! itself (runners and a gateway as children), and how a runner is killed or frozen.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use shoal::config::ShoalConfig;

use super::FailoverArgs;
use crate::cli::children::{self, ShoalChild, free_port};

/// The cluster under drill: one the drill started (children it can kill) or a running one.
pub(super) enum Cluster {
    Own {
        config: ShoalConfig,
        runners: Vec<ShoalChild>,
        gateway: Box<ShoalChild>,
        url: String,
    },
    Existing {
        config: ShoalConfig,
        url: String,
    },
}

impl Cluster {
    pub(super) async fn start(args: &FailoverArgs, config: &ShoalConfig) -> anyhow::Result<Self> {
        let mut config = config.clone();
        config.cluster.name =
            shoal::ClusterName::new(format!("drill-{}", uuid::Uuid::now_v7().simple()))?;
        // Runners bind a port of their own choosing and register the address they got, so
        // no other process can take it between picking and binding.
        let mut runners = Vec::new();
        for n in 1..=args.runners {
            let name = format!("runner {n}");
            runners.push(spawn(
                name,
                &config,
                &["runner", "--listen", "127.0.0.1:0"],
            )?);
        }
        let (gateway, gateway_listen) = spawn_gateway(&config).await?;
        Ok(Self::Own {
            config,
            runners,
            gateway: Box::new(gateway),
            url: format!("http://{gateway_listen}"),
        })
    }

    pub(super) fn config(&self) -> &ShoalConfig {
        match self {
            Self::Own { config, .. } | Self::Existing { config, .. } => config,
        }
    }

    pub(super) fn url(&self) -> &str {
        match self {
            Self::Own { url, .. } | Self::Existing { url, .. } => url,
        }
    }

    /// The pid of the runner at `address`, as its `/status` reports it (so it must run on
    /// this machine).
    pub(super) async fn pid_of(&self, address: &str) -> anyhow::Result<nix::unistd::Pid> {
        let (Self::Own { config, .. } | Self::Existing { config, .. }) = self;
        let status: serde_json::Value = reqwest::Client::new()
            .get(format!("http://{address}/status"))
            .header(
                shoal::transport::http::SECRET_HEADER,
                &config.cluster.secret,
            )
            .send()
            .await?
            .error_for_status()
            .context("the runner's /status (is cluster.secret the cluster's?)")?
            .json()
            .await?;
        let pid = status["pid"]
            .as_i64()
            .context("the runner did not report its pid")?;
        if let Self::Own { runners, .. } = self {
            runners
                .iter()
                .find(|child| child.id().map(i64::from) == Some(pid))
                .context("the victim is not one of the drill's runners")?;
        }
        Ok(nix::unistd::Pid::from_raw(i32::try_from(pid)?))
    }

    pub(super) async fn stop(&mut self) {
        if let Self::Own {
            runners, gateway, ..
        } = self
        {
            gateway.stop().await;
            for child in runners.iter_mut() {
                child.stop().await;
            }
        }
    }
}

pub(super) async fn wait_ready(url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = reqwest::get(format!("{url}/ready")).await
            && response.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the gateway at {url} was not ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(super) fn spawn(
    name: String,
    config: &ShoalConfig,
    args: &[&str],
) -> anyhow::Result<ShoalChild> {
    let mut command = children::shoal_command(args)?;
    command
        .args(["--database-url", &config.database.url])
        .args(["--cluster", config.cluster.name.as_str()])
        .env(
            "SHOAL__CLUSTER__SHARDS_PER_GROUP",
            config.cluster.shards_per_group.to_string(),
        )
        .env("SHOAL__CLUSTER__SECRET", &config.cluster.secret)
        // The drill's own output is the JSON; its children log errors only, unless asked.
        .env(
            "SHOAL__LOG__FILTER",
            std::env::var("SHOAL_DRILL_LOG_FILTER").unwrap_or_else(|_| "error".to_owned()),
        );
    ShoalChild::spawn(name, &mut command)
}

/// Starts the drill's gateway on a free port; another process can take the port between
/// picking and binding, so a gateway that exits at once is started again on another.
pub(super) async fn spawn_gateway(config: &ShoalConfig) -> anyhow::Result<(ShoalChild, String)> {
    for _ in 0..5 {
        let listen = format!("127.0.0.1:{}", free_port()?);
        let name = format!("gateway ({listen})");
        let mut gateway = spawn(name, config, &["gateway", "--listen", &listen])?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            if gateway.exited()?.is_some() {
                break;
            }
            if reqwest::get(format!("http://{listen}/health"))
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok((gateway, listen));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        gateway.stop().await;
    }
    anyhow::bail!("the drill's gateway did not start (5 attempts)")
}
