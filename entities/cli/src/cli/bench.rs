//! `shoal bench`: a closed-loop load generator. C callers send N requests over E counter
//! entities (persisted `increment` or volatile `get`) directly through the client API, and
//! one JSON object with throughput and latency percentiles goes to stdout.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use shoal::client::{ClientConfig, ClientParts, Request, ShoalClient};
use shoal::config::{ConfigLoader, ShoalConfig};
use shoal::ids::{EntityAddress, EntityId, EntityType};
use shoal::message_storage::Reply;
use shoal::message_storage::postgres::{BatchConfig, PgMessageStorage};
use shoal::runner_storage::postgres::{LockSessionSettings, PgRunnerStorage};
use shoal::transport::http::HttpTransport;
use tokio_util::sync::CancellationToken;

use super::{ClusterArgs, DatabaseArgs};

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Send through this gateway (HTTP) instead of asking runners directly.
    #[arg(long, env = "SHOAL_BENCH_GATEWAY")]
    gateway: Option<String>,
    /// Requests to send in all.
    #[arg(long, default_value_t = 20_000, env = "SHOAL_BENCH_REQUESTS")]
    requests: usize,
    /// Distinct counter entities.
    #[arg(long, default_value_t = 1_000, env = "SHOAL_BENCH_ENTITIES")]
    entities: usize,
    /// Concurrent callers.
    #[arg(long, default_value_t = 64, env = "SHOAL_BENCH_CONCURRENCY")]
    concurrency: usize,
    /// Send persisted `increment`s (default: volatile `get`s).
    #[arg(long)]
    persisted: bool,
    /// Entity id prefix (default: a fresh one per run).
    #[arg(long)]
    prefix: Option<String>,
    /// Print JSON only (the default output is JSON too; kept for scripts).
    #[arg(long)]
    json: bool,
}

impl BenchArgs {
    pub(crate) fn apply(&self, loader: ConfigLoader) -> ConfigLoader {
        loader
            .set("database.url", self.db.database_url.clone())
            .set("cluster.name", self.cluster.cluster.clone())
    }
}

#[derive(Debug, Serialize)]
struct BenchReport {
    mode: &'static str,
    path: &'static str,
    requests: usize,
    entities: usize,
    concurrency: usize,
    errors: usize,
    elapsed_s: f64,
    throughput_per_s: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// Where requests go: the client API (direct to runners) or a gateway over HTTP.
#[derive(Clone)]
enum Target {
    Direct(ShoalClient),
    Gateway { http: reqwest::Client, url: String },
}

impl Target {
    /// One request; true if it got a successful reply.
    async fn call(
        &self,
        counter: &EntityType,
        entity: String,
        persisted: bool,
    ) -> anyhow::Result<bool> {
        match self {
            Self::Direct(client) => {
                let address = EntityAddress {
                    entity_type: counter.clone(),
                    entity_id: EntityId::new(entity)?,
                };
                let request = if persisted {
                    Request::persisted(address, "increment", serde_json::json!({}))
                } else {
                    Request::volatile(address, "get", serde_json::json!({}))
                };
                Ok(matches!(client.ask(request).await, Ok(Reply::Ok { .. })))
            }
            Self::Gateway { http, url } => {
                let message = if persisted { "increment" } else { "get" };
                let response = http
                    .post(format!("{url}/entities/{counter}/{entity}/{message}"))
                    .json(&serde_json::json!({}))
                    .send()
                    .await;
                Ok(response.is_ok_and(|r| r.status().is_success()))
            }
        }
    }
}

pub(crate) async fn run(args: &BenchArgs, config: ShoalConfig) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let target = match &args.gateway {
        Some(url) => Target::Gateway {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(args.concurrency.max(1))
                .build()?,
            url: url.trim_end_matches('/').to_owned(),
        },
        None => {
            let client = connect_client(&config, shutdown.clone()).await?;
            anyhow::ensure!(
                client.wait_for_runners(Duration::from_secs(10)).await,
                "no live runners in cluster `{}`",
                config.cluster.name
            );
            Target::Direct(client)
        }
    };
    let prefix = args
        .prefix
        .clone()
        .unwrap_or_else(|| format!("bench-{}", uuid::Uuid::now_v7().simple()));
    let report = drive(&target, args, &prefix).await?;
    shutdown.cancel();
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// A client for one-shot commands, connected like a runner's.
pub(crate) async fn connect_client(
    config: &ShoalConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<ShoalClient> {
    let db = &config.database;
    let pool = shoal::runner_storage::postgres::connect_pool(
        &db.url,
        db.pool_max_connections,
        db.connect_timeout,
    )
    .await
    .with_context(|| format!("connecting to {}", super::redact(&db.url)))?;
    let runners = PgRunnerStorage::new(
        pool.clone(),
        &db.url,
        config.cluster.name.clone(),
        LockSessionSettings::default(),
    )?;
    let messages = PgMessageStorage::new(pool, config.cluster.name.clone(), BatchConfig::default());
    let transport =
        HttpTransport::new(config.cluster.secret.clone()).map_err(anyhow::Error::msg)?;
    Ok(ShoalClient::start(
        ClientParts {
            sharding: config.sharding(),
            runners: Arc::new(runners),
            messages: Arc::new(messages),
            transport: Arc::new(transport),
            machine_id: shoal::snowflake::random_machine_id(),
            config: ClientConfig::default(),
        },
        shutdown,
    ))
}

async fn drive(target: &Target, args: &BenchArgs, prefix: &str) -> anyhow::Result<BenchReport> {
    let counter = EntityType::new("counter")?;
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let progress = tokio::spawn(report_progress(next.clone(), args.requests));
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let target = target.clone();
        let next = next.clone();
        let errors = errors.clone();
        let counter = counter.clone();
        let (requests, entities, persisted) = (args.requests, args.entities.max(1), args.persisted);
        let prefix = prefix.to_owned();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                let entity = format!("{prefix}-{}", i % entities);
                let sent = Instant::now();
                if target.call(&counter, entity, persisted).await? {
                    latencies.push(sent.elapsed());
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(args.requests);
    for worker in workers {
        latencies.extend(worker.await??);
    }
    let elapsed = started.elapsed();
    progress.abort();
    eprintln!();
    latencies.sort();
    let pick = |q: f64| percentile_ms(&latencies, q);
    Ok(BenchReport {
        mode: if args.persisted {
            "persisted"
        } else {
            "volatile"
        },
        path: if args.gateway.is_some() {
            "gateway"
        } else {
            "direct"
        },
        requests: args.requests,
        entities: args.entities,
        concurrency: args.concurrency,
        errors: errors.load(Ordering::Relaxed),
        elapsed_s: elapsed.as_secs_f64(),
        throughput_per_s: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pick(0.50),
        p90_ms: pick(0.90),
        p99_ms: pick(0.99),
        max_ms: latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
    })
}

fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

async fn report_progress(next: Arc<AtomicUsize>, total: usize) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let done = next.load(Ordering::Relaxed).min(total);
        eprint!("\rsent {done}/{total}");
    }
}
