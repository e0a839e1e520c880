//! Limiter decisions per second and latency from one process with 64 concurrent callers,
//! beside Redis' own `redis-benchmark -t get -n 100000 -c 64 -q` on the same machine (the
//! ratio is the figure: one decision is one `EVALSHA` of a script that runs several
//! commands).
//!
//! First a fixed run of 100,000 decisions per limiter, printed as one JSON object (rate,
//! p50, p99, and the plain-GET rate and ratio when `redis-benchmark` is installed); then a
//! criterion group over the same work. Connects to `SHOAL_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`) under a fresh key prefix, deleted at the end; without a
//! reachable Redis it prints why and measures nothing, so `cargo bench` still succeeds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use shoal::ClusterName;
use shoal::config::RedisConfig;
use shoal::redis::RedisClient;
use shoal::redis::limits::{SlidingWindow, TokenBucket};
use tokio::runtime::Runtime;

const CALLERS: usize = 64;
const DECISIONS: usize = 100_000;
/// Keys the decisions spread over, as tenants would.
const KEYS: usize = 1024;

/// One limiter decision for key number `i`.
type Decide = Arc<dyn Fn(usize) -> futures::future::BoxFuture<'static, bool> + Send + Sync>;

fn limiters(client: &RedisClient) -> Vec<(&'static str, Decide)> {
    let sliding = SlidingWindow::new(client.clone(), "bench", 1_000, Duration::from_secs(60));
    let bucket = TokenBucket::new(client.clone(), "bench", 100_000, Duration::from_secs(60))
        .expect("a bucket of 100,000 tokens per minute");
    let sliding: Decide = Arc::new(move |i| {
        let sliding = sliding.clone();
        Box::pin(async move {
            let key = format!("tenant-{}", i % KEYS);
            sliding.check(&key).await.expect("a decision").allowed
        })
    });
    let bucket: Decide = Arc::new(move |i| {
        let bucket = bucket.clone();
        Box::pin(async move {
            let key = format!("provider-{}", i % KEYS);
            bucket.check(&key, 10).await.expect("a decision").allowed
        })
    });
    vec![("sliding_window", sliding), ("token_bucket", bucket)]
}

/// `total` decisions by `CALLERS` tasks; returns the wall time and every latency.
async fn run(decide: &Decide, total: usize) -> (Duration, Vec<Duration>) {
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..CALLERS {
        let decide = decide.clone();
        callers.spawn(async move {
            let mut latencies = Vec::with_capacity(total / CALLERS + 1);
            let mut i = caller;
            while i < total {
                let one = Instant::now();
                decide(i).await;
                latencies.push(one.elapsed());
                i += CALLERS;
            }
            latencies
        });
    }
    let mut latencies: Vec<Duration> = callers.join_all().await.into_iter().flatten().collect();
    latencies.sort_unstable();
    (started.elapsed(), latencies)
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

/// Requests per second of `redis-benchmark -t get -n 100000 -c 64 -q`, if installed.
fn plain_get_rate(url: &str) -> Option<f64> {
    let address = url.trim_start_matches("redis://");
    let (host, port) = address.split_once(':').unwrap_or((address, "6379"));
    let port = port.trim_end_matches('/');
    let output = std::process::Command::new("redis-benchmark")
        .args([
            "-h", host, "-p", port, "-t", "get", "-n", "100000", "-c", "64", "-q",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "GET: 98039.22 requests per second, p50=0.327 msec"
    let line = text
        .rsplit('\r')
        .next()?
        .lines()
        .find(|l| l.contains("GET"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    let url = shoal_testkit::redis::redis_url();
    let runtime = Runtime::new().expect("a tokio runtime");
    let prefix = format!("shoal-bench:{}", uuid::Uuid::now_v7().simple());
    let config = RedisConfig {
        url: Some(url.clone()),
        key_prefix: Some(prefix),
        ..RedisConfig::default()
    };
    let cluster = ClusterName::new("bench").expect("a cluster name");
    let client = match runtime.block_on(async {
        let client = RedisClient::connect(&config, &cluster)?;
        client.health().await?;
        Ok::<_, shoal::redis::RedisError>(client)
    }) {
        Ok(client) => client,
        Err(error) => {
            eprintln!("redis_limits: skipped, Redis at {url} is unreachable: {error}");
            return;
        }
    };
    let limiters = limiters(&client);
    let plain = plain_get_rate(&url);
    let mut report = serde_json::Map::new();
    for (name, decide) in &limiters {
        runtime.block_on(run(decide, 2_000)); // warm-up: scripts loaded, connection open
        let (elapsed, latencies) = runtime.block_on(run(decide, DECISIONS));
        let rate = DECISIONS as f64 / elapsed.as_secs_f64();
        report.insert(
            (*name).to_owned(),
            serde_json::json!({
                "decisions": DECISIONS,
                "callers": CALLERS,
                "decisions_per_sec": rate.round(),
                "p50_ms": quantile(&latencies, 0.50),
                "p99_ms": quantile(&latencies, 0.99),
                "ratio_to_plain_get": plain.map(|p| (rate / p * 1000.0).round() / 1000.0),
            }),
        );
    }
    report.insert(
        "redis_benchmark_get_per_sec".to_owned(),
        serde_json::json!(plain),
    );
    println!("{}", serde_json::Value::Object(report));

    let mut criterion = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let mut group = criterion.benchmark_group("redis_limits");
    group.throughput(Throughput::Elements(1));
    for (name, decide) in &limiters {
        group.bench_function(*name, |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let decide = decide.clone();
                async move { run(&decide, iters as usize).await.0 }
            });
        });
    }
    group.finish();
    criterion.final_summary();

    runtime.block_on(shoal_testkit::redis::delete_prefixed(&client));
}
