//! `shoal webhooks list|enable`: the webhook endpoints disabled after a `410 Gone`, read
//! and re-enabled straight in the cluster's Redis (JSON output). An endpoint is a tenant's
//! exact URL (query included), so `enable` takes the URL as `list` shows it and, for a
//! tenant's jobs, `--tenant`.

use anyhow::Context;
use clap::{Args, Subcommand};
use shoal::config::{ConfigLoader, ShoalConfig};
use shoal::redis::RedisClient;
use shoal_jobs::webhook::endpoints::{Endpoint, Endpoints};

use super::ClusterArgs;

#[derive(Debug, Subcommand)]
pub(crate) enum WebhooksCommand {
    /// The disabled endpoints, with when and why (JSON).
    List(RedisArgs),
    /// Enables a disabled endpoint again: its URL as `list` shows it (query included; a
    /// fragment is ignored) and its tenant, if it has one.
    Enable {
        /// The endpoint's URL.
        url: String,
        /// The tenant whose jobs disabled it (as `list` shows it); none for jobs without
        /// a tenant.
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        redis: RedisArgs,
    },
}

/// `--redis-url` and `--cluster` (the key prefix).
#[derive(Debug, Args)]
pub(crate) struct RedisArgs {
    /// Redis URL.
    #[arg(long, env = "SHOAL__REDIS__URL")]
    redis_url: Option<String>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

impl WebhooksCommand {
    fn redis_args(&self) -> &RedisArgs {
        match self {
            Self::List(redis) | Self::Enable { redis, .. } => redis,
        }
    }

    pub(crate) fn apply(&self, loader: ConfigLoader) -> ConfigLoader {
        let args = self.redis_args();
        loader
            .set("redis.url", args.redis_url.clone())
            .set("cluster.name", args.cluster.cluster.clone())
    }

    pub(crate) async fn run(&self, config: ShoalConfig) -> anyhow::Result<()> {
        let redis = RedisClient::connect(&config.redis, &config.cluster.name)
            .context("`shoal webhooks` needs the cluster's Redis (--redis-url)")?;
        let endpoints = Endpoints::new(redis);
        let output = match self {
            Self::List(_) => {
                let disabled = endpoints.list().await?;
                let rows: Vec<_> = disabled
                    .into_iter()
                    .map(|(endpoint, d)| {
                        serde_json::json!({
                            "endpoint": endpoint.url,
                            "tenant": endpoint.tenant,
                            "at": d.at,
                            "reason": d.reason,
                        })
                    })
                    .collect();
                serde_json::json!({ "disabled": rows })
            }
            Self::Enable { url, tenant, .. } => {
                let url =
                    reqwest::Url::parse(url).with_context(|| format!("`{url}` is not a URL"))?;
                let endpoint = Endpoint::of(tenant.as_deref(), &url);
                let was_disabled = endpoints.enable(&endpoint).await?;
                serde_json::json!({
                    "endpoint": endpoint.url,
                    "tenant": endpoint.tenant,
                    "was_disabled": was_disabled,
                })
            }
        };
        println!("{output}");
        Ok(())
    }
}
