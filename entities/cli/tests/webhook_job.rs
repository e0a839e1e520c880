//! The `webhook` job type, run attempt by attempt (`JobContext::new_for_test`) against the
//! testkit's receiver, which verifies every signature with the Standard Webhooks project's
//! Python implementation, and the shared Redis (a key prefix per test): the verdicts become
//! the job's next step, `Retry-After` is a minimum delay, a 410 disables the endpoint for
//! every runner until it is enabled again (per tenant and exact URL), and the per-endpoint
//! breaker stops calls.

use std::time::Duration;

use serde_json::json;
use shoal::config::{BreakerConfig, RedisConfig};
use shoal::ids::ClusterName;
use shoal::redis::RedisClient;
use shoal_jobs::webhook::endpoints::Endpoint;
use shoal_jobs::webhook::job::{WebhookConfig, WebhookJob, WebhookPayload};
use shoal_jobs::{JobContext, JobError, JobHandler, JobId};
use shoal_testkit::Receiver;
use shoal_testkit::redis::{delete_prefixed, redis_url, unique_prefix};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OTHER_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

/// A Redis client under a prefix of this test's own.
fn redis() -> anyhow::Result<RedisClient> {
    let config = RedisConfig {
        url: Some(redis_url()),
        key_prefix: Some(unique_prefix()),
        ..RedisConfig::default()
    };
    Ok(RedisClient::connect(&config, &ClusterName::new("test")?)?)
}

fn config(secrets: &[&str]) -> WebhookConfig {
    WebhookConfig {
        secrets: secrets.iter().map(|s| (*s).to_owned()).collect(),
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(5),
        backoff_first: Duration::from_millis(100),
        allowed_networks: vec!["127.0.0.0/8".parse().expect("a network")],
        ..WebhookConfig::default()
    }
}

fn payload(url: &str) -> WebhookPayload {
    serde_json::from_value(json!({"url": url, "body": {"event": "job.done", "n": 1}}))
        .expect("a valid payload")
}

/// Runs attempt `attempt` of job `job`.
async fn run(
    job: &WebhookJob,
    id: JobId,
    attempt: u32,
    url: &str,
) -> Result<shoal_jobs::webhook::job::WebhookDelivered, JobError> {
    run_as(job, None, id, attempt, url).await
}

/// Runs attempt `attempt` of job `job` of `tenant`.
async fn run_as(
    job: &WebhookJob,
    tenant: Option<&str>,
    id: JobId,
    attempt: u32,
    url: &str,
) -> Result<shoal_jobs::webhook::job::WebhookDelivered, JobError> {
    let (ctx, _cancel) = JobContext::new_for_test(id, attempt);
    job.run(&ctx.with_tenant(tenant), payload(url)).await
}

fn after(result: &Result<impl std::fmt::Debug, JobError>) -> Option<Duration> {
    match result {
        Err(JobError::Retryable { after, .. }) => *after,
        other => panic!("expected a retryable failure, got {other:?}"),
    }
}

/// Runs the `shoal` binary against `redis`'s Redis and prefix; its JSON output.
fn shoal_cli(redis: &RedisClient, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .args(["--redis-url", &redis_url()])
        .env("SHOAL__REDIS__KEY_PREFIX", redis.prefix())
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "shoal {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

#[tokio::test]
async fn a_delivery_verifies_and_a_stranger_secret_is_dead_at_once() -> anyhow::Result<()> {
    let receiver = Receiver::start(SECRET)?;
    let redis = redis()?;
    // Rotation: the receiver knows only the older secret, second in the list.
    let job = WebhookJob::new(&config(&[OTHER_SECRET, SECRET]), redis.clone())?;
    let id = JobId::new();
    let delivered = run(&job, id, 1, &receiver.url("/ok")).await?;
    assert_eq!(delivered.status, 204);
    let log = receiver.log_of("/ok").await?;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["verified"], true);
    assert_eq!(log[0]["id"], id.to_string(), "webhook-id is the job id");
    assert_eq!(log[0]["body"], r#"{"event":"job.done","n":1}"#);

    let stranger = WebhookJob::new(&config(&[OTHER_SECRET]), redis.clone())?;
    let refused = run(&stranger, JobId::new(), 1, &receiver.url("/ok")).await;
    match refused {
        Err(JobError::Permanent { message }) => assert!(message.contains("401"), "{message}"),
        other => panic!("a refused signature is permanent: {other:?}"),
    }
    assert_eq!(receiver.log_of("/ok").await?[1]["verified"], false);
    delete_prefixed(&redis).await;
    Ok(())
}

#[tokio::test]
async fn statuses_become_retries_with_retry_after_as_a_minimum_or_dead_jobs() -> anyhow::Result<()>
{
    let receiver = Receiver::start(SECRET)?;
    let redis = redis()?;
    let job = WebhookJob::new(&config(&[SECRET]), redis.clone())?;

    // 500 then 200: the first attempt is retryable, the second delivers the same message.
    let id = JobId::new();
    let url = receiver.url("/sequence/flaky?codes=500,200");
    let first = run(&job, id, 1, &url).await;
    assert_eq!(after(&first), None, "a 500 waits the backoff");
    assert_eq!(run(&job, id, 2, &url).await?.status, 200);
    let log = receiver.log_of("/sequence/flaky").await?;
    assert_eq!(log.len(), 2);
    assert_eq!(
        log[0]["id"], log[1]["id"],
        "every attempt has the same webhook-id"
    );

    // 400: dead at once.
    let bad = run(&job, JobId::new(), 1, &receiver.url("/status/400")).await;
    assert!(matches!(bad, Err(JobError::Permanent { .. })), "{bad:?}");

    // 429 with Retry-After: 2 → at least 2 s, even though the backoff is 100 ms.
    let limited = run(
        &job,
        JobId::new(),
        1,
        &receiver.url("/status/429?retry_after=2"),
    )
    .await;
    assert!(
        after(&limited) >= Some(Duration::from_secs(2)),
        "{limited:?}"
    );
    // A backoff longer than the Retry-After wins: attempt 8 waits ≥ 100 ms × 2^7.
    let late = run(
        &job,
        JobId::new(),
        8,
        &receiver.url("/status/429?retry_after=2"),
    )
    .await;
    assert!(
        after(&late) >= Some(Duration::from_millis(12_800)),
        "{late:?}"
    );

    // A receiver that hangs past the response timeout: retryable, timed out.
    let impatient = WebhookJob::new(
        &WebhookConfig {
            response_timeout: Duration::from_millis(300),
            ..config(&[SECRET])
        },
        redis.clone(),
    )?;
    let hung = run(
        &impatient,
        JobId::new(),
        1,
        &receiver.url("/hang?seconds=10"),
    )
    .await;
    match &hung {
        Err(JobError::Retryable { message, .. }) => {
            assert!(message.starts_with("timed out"), "{message}")
        }
        other => panic!("a hang is retryable: {other:?}"),
    }
    delete_prefixed(&redis).await;
    Ok(())
}

#[tokio::test]
async fn a_410_disables_the_endpoint_for_every_runner_until_enabled() -> anyhow::Result<()> {
    let receiver = Receiver::start(SECRET)?;
    let redis = redis()?;
    let job = WebhookJob::new(&config(&[SECRET]), redis.clone())?;
    // Another runner: its own client, the same Redis prefix.
    let other_runner = WebhookJob::new(&config(&[SECRET]), redis.clone())?;
    let url = receiver.url("/sequence/gone?codes=410,204");
    let gone = run(&job, JobId::new(), 1, &url).await;
    assert!(matches!(&gone, Err(JobError::Permanent { message }) if message.contains("410")));

    let later = run(&other_runner, JobId::new(), 1, &url).await;
    match &later {
        Err(JobError::Permanent { message }) => {
            assert!(message.contains("is disabled"), "{message}");
            assert!(message.contains("shoal webhooks enable"), "{message}");
        }
        other => panic!("a disabled endpoint is dead at once: {other:?}"),
    }
    assert_eq!(
        receiver.log_of("/sequence/gone").await?.len(),
        1,
        "not called"
    );

    // The operator's way back: `shoal webhooks list`, then `enable` with any URL of it.
    let endpoint = Endpoint::of(None, &reqwest::Url::parse(&url)?);
    assert_eq!(job.endpoints().list().await?.len(), 1);
    let listed = shoal_cli(&redis, &["webhooks", "list"])?;
    assert_eq!(listed["disabled"][0]["endpoint"], endpoint.as_str());
    assert!(
        listed["disabled"][0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("410")
    );
    let enabled = shoal_cli(&redis, &["webhooks", "enable", &url])?;
    assert_eq!(enabled["was_disabled"], true, "{enabled}");
    assert_eq!(
        shoal_cli(&redis, &["webhooks", "list"])?["disabled"],
        json!([])
    );
    assert_eq!(run(&other_runner, JobId::new(), 1, &url).await?.status, 204);
    delete_prefixed(&redis).await;
    Ok(())
}

#[tokio::test]
async fn the_breaker_opens_after_the_threshold_and_stops_calling_the_endpoint() -> anyhow::Result<()>
{
    let receiver = Receiver::start(SECRET)?;
    let redis = redis()?;
    let reset = Duration::from_secs(3);
    let job = WebhookJob::new(
        &WebhookConfig {
            breaker: BreakerConfig {
                failure_threshold: 3,
                failure_window: Duration::from_secs(30),
                reset_timeout: reset,
                half_open_max_calls: 1,
            },
            ..config(&[SECRET])
        },
        redis.clone(),
    )?;
    let url = receiver.url("/sequence/down?codes=503,503,503,204");
    for attempt in 1..=3 {
        let failed = run(&job, JobId::new(), attempt, &url).await;
        assert_eq!(after(&failed), None, "attempt {attempt}: {failed:?}");
    }
    // Open: not called, and the wait asked for is the breaker's remaining open time.
    let skipped = run(&job, JobId::new(), 1, &url).await;
    let wait = after(&skipped).expect("an open breaker names its wait");
    assert!(wait > Duration::from_secs(1) && wait <= reset, "{wait:?}");
    assert!(
        matches!(&skipped, Err(JobError::Retryable { message, .. }) if message.contains("open")),
        "{skipped:?}"
    );
    assert_eq!(receiver.log_of("/sequence/down").await?.len(), 3);
    // Another endpoint is not affected.
    assert_eq!(
        run(&job, JobId::new(), 1, &receiver.url("/ok"))
            .await?
            .status,
        204
    );

    // After the reset timeout, one trial call goes through and closes it.
    tokio::time::sleep(wait).await;
    assert_eq!(run(&job, JobId::new(), 1, &url).await?.status, 204);
    assert_eq!(receiver.log_of("/sequence/down").await?.len(), 4);
    delete_prefixed(&redis).await;
    Ok(())
}

#[tokio::test]
async fn a_410_disables_only_its_tenants_exact_url() -> anyhow::Result<()> {
    let receiver = Receiver::start(SECRET)?;
    let redis = redis()?;
    let job = WebhookJob::new(&config(&[SECRET]), redis.clone())?;
    // One receiver path, told apart by the query: 410 first, then 204 for every call.
    let revoked = receiver.url("/sequence/shared?codes=410,204&token=revoked");
    let good = receiver.url("/sequence/shared?codes=410,204&token=good");
    let acme = Some("acme");
    let gone = run_as(&job, acme, JobId::new(), 1, &revoked).await;
    assert!(matches!(&gone, Err(JobError::Permanent { message }) if message.contains("410")));

    // The same path with another query, and the same URL for another tenant: delivered.
    assert_eq!(
        run_as(&job, acme, JobId::new(), 1, &good).await?.status,
        204
    );
    assert_eq!(
        run_as(&job, Some("beta"), JobId::new(), 1, &revoked)
            .await?
            .status,
        204
    );
    assert_eq!(
        run_as(&job, None, JobId::new(), 1, &revoked).await?.status,
        204
    );
    // acme's revoked URL stays disabled, and the way back names the tenant.
    match run_as(&job, acme, JobId::new(), 1, &revoked).await {
        Err(JobError::Permanent { message }) => {
            assert!(message.contains("is disabled"), "{message}");
            assert!(message.contains("--tenant acme"), "{message}");
        }
        other => panic!("acme's revoked URL is disabled: {other:?}"),
    }
    assert_eq!(receiver.log_of("/sequence/shared").await?.len(), 4);

    let listed = shoal_cli(&redis, &["webhooks", "list"])?;
    assert_eq!(
        listed["disabled"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    assert_eq!(listed["disabled"][0]["endpoint"], revoked.as_str());
    assert_eq!(listed["disabled"][0]["tenant"], "acme");
    // Without the tenant it is another endpoint; with it, enabled again.
    let untenanted = shoal_cli(&redis, &["webhooks", "enable", &revoked])?;
    assert_eq!(untenanted["was_disabled"], false, "{untenanted}");
    let enabled = shoal_cli(
        &redis,
        &["webhooks", "enable", "--tenant", "acme", &revoked],
    )?;
    assert_eq!(enabled["was_disabled"], true, "{enabled}");
    assert_eq!(
        run_as(&job, acme, JobId::new(), 1, &revoked).await?.status,
        204
    );
    delete_prefixed(&redis).await;
    Ok(())
}

#[tokio::test]
async fn a_name_resolving_to_a_refused_address_is_dead_without_a_connection() -> anyhow::Result<()>
{
    let receiver = Receiver::start(SECRET)?;
    let redis = redis()?;
    let strict = WebhookJob::new(
        &WebhookConfig {
            allowed_networks: Vec::new(),
            ..config(&[SECRET])
        },
        redis.clone(),
    )?;
    let named = receiver.url("/ok").replace("127.0.0.1", "localhost");
    let (ctx, _cancel) = JobContext::new_for_test(JobId::new(), 1);
    let refused = strict.run(&ctx, payload(&named)).await;
    match &refused {
        Err(JobError::Permanent { message }) => {
            assert!(
                message.contains("resolves only to refused addresses"),
                "{message}"
            );
        }
        other => panic!("refused at the resolver, permanently: {other:?}"),
    }
    assert_eq!(receiver.log().await?.len(), 0, "no connection was made");
    // It says nothing of the endpoint: the breaker does not count it.
    for _ in 0..6 {
        let again = strict.run(&ctx, payload(&named)).await;
        assert!(
            matches!(again, Err(JobError::Permanent { .. })),
            "{again:?}"
        );
    }
    delete_prefixed(&redis).await;
    Ok(())
}
