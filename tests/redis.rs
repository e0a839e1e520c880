//! The Redis layer against a real Redis (`SHOAL_TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`): every test uses its own key prefix, so tests run in parallel
//! and rerun cleanly.
//!
//! Cross-process tests re-run this test binary as child processes (the
//! `child_process_role` entry below does nothing unless `SHOAL_REDIS_TEST_ROLE` is set):
//! each child has its own connection and runtime, as separate replicas would. The outage test
//! starts its own `redis-server` on a free port and kills it; the shared Redis is never
//! stopped.

use std::process::Stdio;
use std::sync::LazyLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use proptest::prelude::*;
use shoal::ClusterName;
use shoal::config::{BreakerConfig, CacheConfig, RedisConfig};
use shoal::redis::breaker::{BreakerError, BreakerState, CircuitBreaker, Outcome};
use shoal::redis::cache::Cache;
use shoal::redis::limits::math::{self, Verdict};
use shoal::redis::limits::{
    Admission, ConcurrencyLimit, Decision, FixedWindow, LimitError, SlidingWindow, TokenBucket,
};
use shoal::redis::{RedisClient, RedisError};
use shoal_testkit::redis::{delete_prefixed, redis_url, unique_prefix};
use shoal_testkit::{DEADLINE, OwnRedis, wait_until};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

const ROLE: &str = "SHOAL_REDIS_TEST_ROLE";
const PREFIX: &str = "SHOAL_REDIS_TEST_PREFIX";

fn config(url: &str, prefix: &str) -> RedisConfig {
    RedisConfig {
        url: Some(url.to_owned()),
        key_prefix: Some(prefix.to_owned()),
        ..RedisConfig::default()
    }
}

/// A client of its own (its own connection), like one replica.
fn replica(prefix: &str) -> anyhow::Result<RedisClient> {
    let cluster = ClusterName::new("test")?;
    Ok(RedisClient::connect(
        &config(&redis_url(), prefix),
        &cluster,
    )?)
}

// ---------------------------------------------------------------------------------------
// Sliding window: exact across replicas
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_window_admits_exactly_the_limit_across_replicas() -> anyhow::Result<()> {
    let prefix = unique_prefix();
    let replicas = [replica(&prefix)?, replica(&prefix)?, replica(&prefix)?];
    let limiters: Vec<_> = replicas
        .iter()
        .map(|c| SlidingWindow::new(c.clone(), "api", 100, Duration::from_secs(60)))
        .collect();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..300 {
        let limiter = limiters[i % 3].clone();
        calls.spawn(async move { limiter.check("tenant:127.0.0.1").await });
    }
    let decisions: Vec<Decision> = calls
        .join_all()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let admitted = decisions.iter().filter(|d| d.allowed).count();
    ensure!(admitted == 100, "{admitted} admitted, expected exactly 100");
    for refused in decisions.iter().filter(|d| !d.allowed) {
        ensure!(refused.remaining == 0, "{refused:?}");
        ensure!(
            refused.retry_after > Duration::ZERO && refused.retry_after <= Duration::from_secs(60),
            "{refused:?}"
        );
    }
    // Another key has its own window.
    ensure!(limiters[0].check("other:127.0.0.1").await?.allowed);
    delete_prefixed(&replicas[0]).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The Lua scripts against the Rust model, through a real Redis
// ---------------------------------------------------------------------------------------

/// One runtime and client for the property tests (proptest bodies are synchronous).
static MODEL_RT: LazyLock<(tokio::runtime::Runtime, RedisClient)> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime for the property tests");
    let client = runtime
        .block_on(async { replica(&unique_prefix()) })
        .expect("a redis client");
    (runtime, client)
});

fn ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn same(decision: &Decision, verdict: &Verdict) -> bool {
    decision.allowed == verdict.allowed
        && decision.remaining == verdict.remaining
        && ms(decision.reset_at) == verdict.reset_at
        && decision.retry_after.as_millis() as i64 == verdict.retry_after
}

const T0: i64 = 1_700_000_000_000;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn lua_limiters_match_the_model(
        limit in 1u64..12,
        window in 1u64..3_000,
        capacity in 1u64..200,
        period in 1u64..120_000,
        calls in prop::collection::vec((0i64..400, 1u64..20), 1..60),
    ) {
        let (runtime, client) = &*MODEL_RT;
        let key = uuid::Uuid::now_v7().simple().to_string();
        let result: anyhow::Result<()> = runtime.block_on(async {
            let sliding = SlidingWindow::new(client.clone(), "model", limit as u32, Duration::from_millis(window));
            let fixed = FixedWindow::new(client.clone(), "model", limit * 5, Duration::from_millis(window));
            let bucket = TokenBucket::new(client.clone(), "model", capacity, Duration::from_millis(period))?;
            let (mut log, mut counter, mut tokens) = (Vec::new(), None, None);
            let mut now = T0;
            for (gap, cost) in calls {
                now += gap;
                let decision = sliding.check_at(&key, Some(now)).await?;
                let verdict = math::sliding_window(&mut log, limit, window as i64, now);
                ensure!(same(&decision, &verdict), "sliding at {now}: {decision:?} vs {verdict:?}");

                let cost_fw = cost.min(limit * 5);
                let decision = fixed.check_at(&key, cost_fw, Some(now)).await?;
                let verdict = math::fixed_window(&mut counter, limit * 5, window as i64, cost_fw, now);
                ensure!(same(&decision, &verdict), "fixed at {now}: {decision:?} vs {verdict:?}");

                let cost_tb = cost.min(capacity);
                let decision = bucket.check_at(&key, cost_tb, Some(now)).await?;
                let verdict = math::token_bucket(&mut tokens, capacity, period, cost_tb, now);
                ensure!(same(&decision, &verdict), "bucket at {now}: {decision:?} vs {verdict:?}");
            }
            Ok(())
        });
        prop_assert!(result.is_ok(), "{:?}", result);
    }
}

#[tokio::test]
async fn a_cost_above_the_limit_is_refused_without_asking_redis() -> anyhow::Result<()> {
    let client = replica(&unique_prefix())?;
    let bucket = TokenBucket::new(client.clone(), "b", 10, Duration::from_secs(60))?;
    let error = bucket.check("k", 11).await.expect_err("too costly");
    ensure!(
        matches!(
            error,
            LimitError::CostTooHigh {
                cost: 11,
                limit: 10
            }
        ),
        "{error}"
    );
    ensure!(!error.is_retryable());
    // A caller that waits is admitted when the bucket has refilled enough.
    let fast = TokenBucket::new(client.clone(), "fast", 10, Duration::from_millis(200))?;
    ensure!(fast.check("k", 10).await?.allowed);
    let waited = Instant::now();
    let decision = fast
        .acquire(
            "k",
            5,
            Admission::Wait {
                max_wait: Duration::from_secs(5),
            },
        )
        .await?;
    ensure!(decision.allowed && waited.elapsed() >= Duration::from_millis(90));
    let refused = fast.acquire("k", 10, Admission::Refuse).await;
    ensure!(
        matches!(refused, Err(LimitError::Limited { .. })),
        "{refused:?}"
    );
    delete_prefixed(&client).await;
    Ok(())
}

/// Estimate-then-correct: a call charged 100 tokens that used 300 takes 200 more; one
/// that used 20 gives 80 back; a correction beyond the bucket leaves a debt that later
/// calls wait out (the level never goes below minus one bucket).
#[tokio::test]
async fn a_token_bucket_is_corrected_by_the_usage_after_the_call() -> anyhow::Result<()> {
    let client = replica(&unique_prefix())?;
    // 1,000 tokens per hour: refill is 1 token per 3.6 s, negligible within the test.
    let bucket = TokenBucket::new(client.clone(), "b", 1_000, Duration::from_secs(3600))?;
    ensure!(bucket.check("k", 100).await?.remaining == 900);
    ensure!(bucket.adjust("k", 200).await?.remaining == 700);
    ensure!(bucket.adjust("k", -80).await?.remaining == 780);
    // Overspent: a debt (remaining reads 0), and a small call is refused until it refills.
    ensure!(bucket.adjust("k", 1_500).await?.remaining == 0);
    let refused = bucket.check("k", 1).await?;
    ensure!(
        !refused.allowed && refused.retry_after > Duration::from_secs(2000),
        "{refused:?}"
    );
    // Never below minus one bucket: giving back a full bucket makes it usable again.
    bucket.adjust("k", 5_000).await?;
    ensure!(
        bucket.adjust("k", -1_001).await?.remaining <= 1,
        "clamped at minus one bucket"
    );
    delete_prefixed(&client).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------

/// Not a test of its own: the body of the child processes the cross-process tests start
/// (it returns at once when `SHOAL_REDIS_TEST_ROLE` is unset).
#[test]
fn child_process_role() -> anyhow::Result<()> {
    let Ok(role) = std::env::var(ROLE) else {
        return Ok(());
    };
    let prefix = std::env::var(PREFIX).context("prefix")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = replica(&prefix)?;
        match role.as_str() {
            "bucket" => bucket_child(client).await,
            "lease" => lease_child(client).await,
            "hold" => hold_child(client).await,
            other => bail!("unknown role {other}"),
        }
    })
}

const BUCKET_CAPACITY: u64 = 500;
const BUCKET_PERIOD: Duration = Duration::from_secs(3600);
const LEASE_LIMIT: u32 = 3;
const LEASE_TTL: Duration = Duration::from_secs(1);

/// Waits until the parent sets `<prefix>:go`, so every child starts at once.
async fn await_go(client: &RedisClient) -> anyhow::Result<()> {
    println!("READY");
    let mut exists = redis::cmd("EXISTS");
    exists.arg(client.key("test", "go"));
    let started = Instant::now();
    while client.command::<i64>("exists", &exists).await? == 0 {
        ensure!(started.elapsed() < DEADLINE, "no go signal");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Ten consumers taking random costs from one bucket; prints the cost admitted.
async fn bucket_child(client: RedisClient) -> anyhow::Result<()> {
    let bucket = TokenBucket::new(client.clone(), "shared", BUCKET_CAPACITY, BUCKET_PERIOD)?;
    await_go(&client).await?;
    let mut consumers = tokio::task::JoinSet::new();
    for consumer in 0..10u64 {
        let bucket = bucket.clone();
        consumers.spawn(async move {
            let mut admitted = 0;
            for attempt in 0..40u64 {
                let cost = 1 + (consumer * 7 + attempt * 13) % 10;
                if bucket.check("provider", cost).await?.allowed {
                    admitted += cost;
                }
            }
            anyhow::Ok(admitted)
        });
    }
    let mut total = 0;
    for admitted in consumers.join_all().await {
        total += admitted?;
    }
    println!("ADMITTED {total}");
    Ok(())
}

/// Five tasks taking leases in turn; prints how many were in flight at most.
async fn lease_child(client: RedisClient) -> anyhow::Result<()> {
    let limit = ConcurrencyLimit::new(client.clone(), "shared", LEASE_LIMIT, LEASE_TTL);
    await_go(&client).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let (limit, client) = (limit.clone(), client.clone());
        tasks.spawn(async move {
            let (mut most, mut taken) = (0i64, 0u64);
            let mut incr = redis::cmd("INCR");
            incr.arg(client.key("test", "inflight"));
            let mut decr = redis::cmd("DECR");
            decr.arg(client.key("test", "inflight"));
            for _ in 0..10 {
                let wait = Admission::Wait { max_wait: DEADLINE };
                let lease = limit.acquire("provider", wait).await?;
                most = most.max(client.command::<i64>("incr", &incr).await?);
                tokio::time::sleep(Duration::from_millis(5)).await;
                client.command::<i64>("decr", &decr).await?;
                lease.release().await?;
                taken += 1;
            }
            anyhow::Ok((most, taken))
        });
    }
    let (mut most, mut taken) = (0, 0);
    for result in tasks.join_all().await {
        let (m, t) = result?;
        most = most.max(m);
        taken += t;
    }
    println!("LEASES {most} {taken}");
    Ok(())
}

/// Takes every lease and holds them until killed.
async fn hold_child(client: RedisClient) -> anyhow::Result<()> {
    let limit = ConcurrencyLimit::new(client, "shared", LEASE_LIMIT, LEASE_TTL);
    let mut held = Vec::new();
    for _ in 0..LEASE_LIMIT {
        held.push(limit.acquire("provider", Admission::Refuse).await?);
    }
    println!("HELD");
    std::future::pending::<()>().await;
    drop(held);
    Ok(())
}

struct ChildProcess {
    child: Child,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl ChildProcess {
    fn spawn(role: &str, prefix: &str) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args([
                "--exact",
                "child_process_role",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE, role)
            .env(PREFIX, prefix)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("child stdout")?;
        Ok(Self {
            child,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The first line starting with `marker`, without it.
    async fn line(&mut self, marker: &str) -> anyhow::Result<String> {
        let read = async {
            while let Some(line) = self.lines.next_line().await? {
                // libtest may have printed `test child_process_role ... ` on the same line.
                if let Some(at) = line.find(marker) {
                    return Ok(line[at + marker.len()..].trim().to_owned());
                }
            }
            bail!("the child exited before printing {marker}")
        };
        tokio::time::timeout(DEADLINE, read).await?
    }
}

async fn start_children(role: &str, prefix: &str, n: usize) -> anyhow::Result<Vec<ChildProcess>> {
    let mut children = Vec::new();
    for _ in 0..n {
        children.push(ChildProcess::spawn(role, prefix)?);
    }
    for child in &mut children {
        child.line("READY").await?;
    }
    let go = replica(prefix)?;
    let mut set = redis::cmd("SET");
    set.arg(go.key("test", "go")).arg(1).arg("EX").arg(60);
    go.command::<String>("set", &set).await?;
    Ok(children)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_bucket_is_never_exceeded_by_fifty_consumers_in_five_processes() -> anyhow::Result<()>
{
    let prefix = unique_prefix();
    let started = Instant::now();
    let mut children = start_children("bucket", &prefix, 5).await?;
    let mut admitted = 0u64;
    for child in &mut children {
        admitted += child.line("ADMITTED").await?.parse::<u64>()?;
    }
    // What the elapsed time (an upper bound of the run) could have refilled.
    let elapsed = started.elapsed().as_millis() as u64;
    let refill = (elapsed * BUCKET_CAPACITY).div_ceil(BUCKET_PERIOD.as_millis() as u64);
    eprintln!("50 consumers took {admitted} tokens of {BUCKET_CAPACITY} (+{refill} refilled)");
    ensure!(
        admitted <= BUCKET_CAPACITY + refill,
        "{admitted} admitted > {BUCKET_CAPACITY} + {refill}"
    );
    // 2,000 calls asking ~11,000 tokens leave less than the largest cost unused.
    ensure!(admitted + 10 > BUCKET_CAPACITY, "only {admitted} admitted");
    delete_prefixed(&replica(&prefix)?).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_holds_across_processes_and_reclaims_a_killed_holder()
-> anyhow::Result<()> {
    let prefix = unique_prefix();
    let client = replica(&prefix)?;
    let mut children = start_children("lease", &prefix, 4).await?;
    let (mut most, mut taken) = (0, 0);
    for child in &mut children {
        let line = child.line("LEASES").await?;
        let (m, t) = line.split_once(' ').context("LEASES most taken")?;
        most = most.max(m.parse::<i64>()?);
        taken += t.parse::<u64>()?;
    }
    eprintln!("200 leases taken by 20 tasks in 4 processes; at most {most} in flight");
    ensure!(taken == 200, "{taken} leases taken");
    ensure!(
        most <= i64::from(LEASE_LIMIT),
        "{most} in flight > {LEASE_LIMIT}"
    );
    let limit = ConcurrencyLimit::new(client.clone(), "shared", LEASE_LIMIT, LEASE_TTL);
    ensure!(
        limit.in_use("provider").await? == 0,
        "released leases remain"
    );

    // A holder killed with every lease: nobody gets one until the leases expire.
    let mut holder = ChildProcess::spawn("hold", &prefix)?;
    holder.line("HELD").await?;
    let held_at = Instant::now();
    holder.child.start_kill()?;
    holder.child.wait().await?;
    let (decision, lease) = limit.try_acquire("provider").await?;
    ensure!(
        lease.is_none() && !decision.allowed,
        "a lease while all are held: {decision:?}"
    );
    ensure!(decision.retry_after <= LEASE_TTL, "{decision:?}");
    let lease = loop {
        if let (_, Some(lease)) = limit.try_acquire("provider").await? {
            break lease;
        }
        ensure!(
            held_at.elapsed() < DEADLINE,
            "the killed holder's leases were never reclaimed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let reclaimed = held_at.elapsed();
    eprintln!("a killed holder's leases were reclaimed after {reclaimed:?} (ttl {LEASE_TTL:?})");
    ensure!(
        reclaimed >= LEASE_TTL - Duration::from_millis(100),
        "reclaimed after {reclaimed:?}"
    );
    lease.release().await?;
    delete_prefixed(&client).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Circuit breaker
// ---------------------------------------------------------------------------------------

fn breaker_config() -> BreakerConfig {
    BreakerConfig {
        failure_threshold: 3,
        failure_window: Duration::from_secs(10),
        reset_timeout: Duration::from_millis(400),
        half_open_max_calls: 2,
    }
}

async fn fail(breaker: &CircuitBreaker) -> anyhow::Result<BreakerState> {
    let permit = breaker.admit().await?;
    Ok(breaker.record(permit, Outcome::Failure).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_on_one_replica_open_the_breaker_for_all_and_half_open_admits_bounded_trials()
-> anyhow::Result<()> {
    let prefix = unique_prefix();
    let (a, b) = (replica(&prefix)?, replica(&prefix)?);
    let on_a = CircuitBreaker::new(a.clone(), "anthropic", &breaker_config());
    let on_b = CircuitBreaker::new(b.clone(), "anthropic", &breaker_config());

    // Replica A fails three times; replica B finds the breaker open.
    ensure!(fail(&on_a).await? == BreakerState::Closed);
    ensure!(fail(&on_a).await? == BreakerState::Closed);
    ensure!(matches!(fail(&on_a).await?, BreakerState::Open { .. }));
    let refused = on_b.admit().await;
    ensure!(
        matches!(refused, Err(BreakerError::Open { .. })),
        "{refused:?}"
    );
    ensure!(matches!(on_b.state().await?, BreakerState::Open { .. }));
    // Another breaker is unaffected.
    let other = CircuitBreaker::new(b.clone(), "openai", &breaker_config());
    ensure!(other.state().await? == BreakerState::Closed);

    // After the reset timeout, exactly two trial calls pass, from any replica.
    let opened = Instant::now();
    wait_until(DEADLINE, "the breaker turns half-open", || async {
        Ok(on_b.state().await? == BreakerState::HalfOpen)
    })
    .await?;
    ensure!(
        opened.elapsed() >= Duration::from_millis(300),
        "half-open too early"
    );
    let mut admits = tokio::task::JoinSet::new();
    for i in 0..10 {
        let breaker = if i % 2 == 0 {
            on_a.clone()
        } else {
            on_b.clone()
        };
        admits.spawn(async move { breaker.admit().await });
    }
    let mut permits = Vec::new();
    for result in admits.join_all().await {
        match result {
            Ok(permit) => permits.push(permit),
            Err(BreakerError::Open { state, .. }) => ensure!(state == BreakerState::HalfOpen),
            Err(other) => return Err(other.into()),
        }
    }
    ensure!(
        permits.len() == 2,
        "{} trial calls admitted, expected 2",
        permits.len()
    );
    ensure!(permits.iter().all(|p| p.is_trial()));

    // One trial succeeds: closed for everyone.
    let mut permits = permits.into_iter();
    let first = permits.next().context("a permit")?;
    ensure!(on_a.record(first, Outcome::Success).await? == BreakerState::Closed);
    ensure!(on_b.state().await? == BreakerState::Closed);
    for _ in 0..5 {
        let permit = on_b.admit().await?;
        ensure!(!permit.is_trial());
        on_b.record(permit, Outcome::Success).await?;
    }
    // The other trial's late result does not reopen it.
    let second = permits.next().context("a permit")?;
    ensure!(on_b.record(second, Outcome::Failure).await? == BreakerState::Closed);

    // A failed trial opens it again.
    ensure!(fail(&on_a).await? == BreakerState::Closed);
    ensure!(matches!(fail(&on_b).await?, BreakerState::Open { .. }));
    wait_until(DEADLINE, "half-open again", || async {
        Ok(on_a.state().await? == BreakerState::HalfOpen)
    })
    .await?;
    let trial = on_a.admit().await?;
    ensure!(trial.is_trial());
    ensure!(matches!(
        on_a.record(trial, Outcome::Failure).await?,
        BreakerState::Open { .. }
    ));
    ensure!(matches!(on_b.admit().await, Err(BreakerError::Open { .. })));
    delete_prefixed(&a).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Cache
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Extraction {
    entities: Vec<String>,
    model: String,
}

#[tokio::test]
async fn cache_keeps_typed_values_with_ttls_and_drops_undecodable_entries() -> anyhow::Result<()> {
    let client = replica(&unique_prefix())?;
    let defaults = CacheConfig::default();
    let extraction = Cache::<Extraction>::extraction(client.clone(), &defaults);
    let value = Extraction {
        entities: vec!["Ada".to_owned(), "Babbage".to_owned()],
        model: "m1".to_owned(),
    };
    ensure!(extraction.get("text-1").await?.is_none(), "a miss first");
    extraction.put("text-1", &value).await?;
    ensure!(extraction.get("text-1").await? == Some(value.clone()));
    let ttl = extraction.time_to_live("text-1").await?.context("a ttl")?;
    let day = Duration::from_secs(24 * 3600);
    ensure!(
        ttl <= day && ttl > day - Duration::from_secs(60),
        "ttl {ttl:?}"
    );

    let dedup = Cache::<String>::dedup(client.clone(), &defaults);
    ensure!(dedup.put_if_absent("req-1", &"handle-a".to_owned()).await?);
    ensure!(!dedup.put_if_absent("req-1", &"handle-b".to_owned()).await?);
    ensure!(dedup.get("req-1").await?.as_deref() == Some("handle-a"));
    let ttl = dedup.time_to_live("req-1").await?.context("a ttl")?;
    ensure!(
        ttl <= Duration::from_secs(3600) && ttl > Duration::from_secs(3500),
        "{ttl:?}"
    );

    // An entry written by something else (or an older type) is a miss, and is deleted.
    let key = client.key("cache", "extraction:text-2");
    let mut set = redis::cmd("SET");
    set.arg(&key).arg("{not json").arg("EX").arg(60);
    client.command::<String>("set", &set).await?;
    ensure!(
        extraction.get("text-2").await?.is_none(),
        "undecodable is a miss"
    );
    let mut exists = redis::cmd("EXISTS");
    exists.arg(&key);
    ensure!(
        client.command::<i64>("exists", &exists).await? == 0,
        "not deleted"
    );

    // Entries expire.
    let short = Cache::<u32>::new(client.clone(), "short", Duration::from_millis(50));
    short.put("k", &7).await?;
    ensure!(short.get("k").await? == Some(7));
    wait_until(DEADLINE, "the entry expires", || async {
        Ok(short.get("k").await?.is_none())
    })
    .await?;
    ensure!(extraction.remove("text-1").await?);
    delete_prefixed(&client).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Redis down
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_every_operation_fails_fast_and_recovers_without_a_restart()
-> anyhow::Result<()> {
    let mut server = OwnRedis::start().await?;
    let config = RedisConfig {
        command_timeout: Duration::from_millis(300),
        ..config(&server.url(), &unique_prefix())
    };
    let client = RedisClient::connect(&config, &ClusterName::new("test")?)?;
    let limiter = SlidingWindow::new(client.clone(), "api", 1000, Duration::from_secs(60));
    let breaker = CircuitBreaker::new(client.clone(), "p", &breaker_config());
    let cache = Cache::<u32>::new(client.clone(), "c", Duration::from_secs(60));
    ensure!(limiter.check("k").await?.allowed);
    client.health().await?;

    server.kill().await?;
    let started = Instant::now();
    let error = limiter.check("k").await.expect_err("redis is down");
    let took = started.elapsed();
    eprintln!("a limiter call with redis down failed after {took:?}: {error}");
    ensure!(error.is_unavailable() && error.is_retryable(), "{error:?}");
    // Three attempts of at most 300 ms, plus backoff.
    ensure!(took < Duration::from_secs(2), "took {took:?}");
    ensure!(client.health().await.is_err());
    ensure!(matches!(breaker.admit().await, Err(BreakerError::Redis(_))));
    let cached = cache.get("k").await;
    ensure!(
        matches!(cached, Err(ref e) if e.is_unavailable()),
        "{cached:?}"
    );
    let _: Result<(), RedisError> = cache.put("k", &1).await;

    // Back on the same port (empty, scripts unloaded): the same client recovers.
    server.restart().await?;
    let took = wait_until(DEADLINE, "the client recovers", || async {
        Ok(limiter.check("k").await.is_ok())
    })
    .await?;
    eprintln!("recovered {took:?} after redis came back");
    ensure!(breaker.admit().await.is_ok());
    cache.put("k", &5).await?;
    ensure!(cache.get("k").await? == Some(5));
    client.health().await?;
    server.kill().await?;
    Ok(())
}
