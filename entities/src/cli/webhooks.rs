//! `shoal webhooks list|enable`: the webhook endpoints disabled after a `410 Gone`, read
//! and re-enabled straight in the cluster's Redis (JSON output).

use anyhow::Context;
use clap::{Args, Subcommand};
use shoal::config::{ConfigLoader, ShoalConfig};
use shoal::redis::RedisClient;
use shoal_entities::webhook::endpoints::{Endpoint, Endpoints};

use super::ClusterArgs;

#[derive(Debug, Subcommand)]
pub(crate) enum WebhooksCommand {
    /// The disabled endpoints, with when and why (JSON).
    List(RedisArgs),
    /// Enables a disabled endpoint again (any URL of it: query and fragment are ignored).
    Enable {
        /// A URL of the endpoint.
        url: String,
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
                        serde_json::json!({"endpoint": endpoint, "at": d.at, "reason": d.reason})
                    })
                    .collect();
                serde_json::json!({ "disabled": rows })
            }
            Self::Enable { url, .. } => {
                let url =
                    reqwest::Url::parse(url).with_context(|| format!("`{url}` is not a URL"))?;
                let endpoint = Endpoint::of(&url);
                let was_disabled = endpoints.enable(&endpoint).await?;
                serde_json::json!({ "endpoint": endpoint, "was_disabled": was_disabled })
            }
        };
        println!("{output}");
        Ok(())
    }
}
