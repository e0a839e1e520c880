//! The built-in `webhook` job type: one signed delivery attempt per run, its outcome
//! turned into the job's next step.
//!
//! - **Payload** `{url, body, headers?}`: `body` is sent as JSON exactly as signed; `url`
//!   must be `http` without credentials (checked when the job is enqueued; `https` waits
//!   for a TLS backend), and an IP literal must pass the egress policy
//!   ([`super::egress`]; a 400 at enqueue, checked again before each attempt). A name is
//!   judged by what it resolves to: refused addresses only → permanent, nothing sent (the
//!   policy and the name's answer are the same on the next attempt; `POST
//!   /jobs/{id}/retry` runs it again after DNS or the policy changed).
//! - **Verdicts**: 2xx → succeeded. Timeouts, connection errors, 5xx, 408 and 429 →
//!   [`JobError::Retryable`]; a `Retry-After` is the *minimum* next delay (the type's
//!   backoff wins when it is longer). Any other status → [`JobError::Permanent`] (dead at
//!   once); 410 also disables the endpoint for every runner ([`Endpoints`]), so a later job
//!   to it is dead at once with an error naming the way back (`shoal webhooks enable`).
//! - **Endpoints** are per tenant and keep the query ([`Endpoint`]).
//! - **Breaker**: one shared Redis circuit breaker per endpoint (`webhook:<digest>`, no
//!   per-endpoint metric series: tenants choose URLs without bound).
//!   Failures are timeouts, connection errors, 5xx and 408 (a 4xx or 429 shows the
//!   endpoint alive). While it is open the endpoint is not called: the run fails as
//!   retryable after the breaker's remaining open time, noted `skipped: circuit_open`.
//!   Under the job contract such a skip is a recorded attempt and counts towards
//!   `max-attempts`; what it saves is the calls, and the waits it asks for are the
//!   breaker's, so a long outage spends one attempt per reset period, not one per backoff.
//! - **History**: every run notes its record (`outcome`, `status`, `latency_ms`, `detail`
//!   = the response's first bytes or the failure) through [`JobContext::note`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use shoal::config::BreakerConfig;
use shoal::redis::breaker::{BreakerError, CircuitBreaker, Outcome};
use shoal::redis::{RedisClient, RedisError};

use super::egress::{ClusterAddresses, EgressPolicy};
use super::endpoints::{Endpoint, Endpoints};
use super::{Attempt, Delivery, Signer, Verdict, WebhookClient, WebhookError};
use crate::{BackoffPolicy, JobContext, JobError, JobHandler, JobOptions, JobRegistry};

/// `[jobs.webhook]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Signing secrets (`whsec_…`), newest first; every delivery is signed with each.
    /// Required for the type to be registered. Default none.
    pub secrets: Vec<String>,
    /// Longest wait for a connection. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for the whole response once sent. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Attempts before a delivery is dead. Default 10.
    pub max_attempts: u32,
    /// Wait after the first failed attempt (doubling, with jitter). Default `10s`.
    #[serde(with = "humantime_serde")]
    pub backoff_first: Duration,
    /// Longest wait between attempts. Default `1h`.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// The per-endpoint breaker (`[jobs.webhook.breaker]`, as `[redis.breaker]`). Default
    /// 5 failures within `60s` open it for `60s`.
    pub breaker: BreakerConfig,
    /// Networks (CIDR, e.g. `["10.20.0.0/16"]`) a delivery may reach although the egress
    /// policy refuses them (loopback, private, link-local, CGNAT, …; see
    /// `webhook::egress`). Default none: only public addresses.
    pub allowed_networks: Vec<ipnet::IpNet>,
    /// `host:port` addresses no delivery may reach, beyond those a runner knows itself
    /// (the runners, `[gateway] listen`, Postgres, Redis): a load balancer in front of
    /// the gateways, other internal services in an allowed network. Default none.
    pub refused_addresses: Vec<String>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            secrets: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(30),
            max_attempts: 10,
            backoff_first: Duration::from_secs(10),
            backoff_max: Duration::from_secs(3600),
            breaker: BreakerConfig {
                failure_threshold: 5,
                failure_window: Duration::from_secs(60),
                reset_timeout: Duration::from_secs(60),
                half_open_max_calls: 1,
            },
            allowed_networks: Vec::new(),
            refused_addresses: Vec::new(),
        }
    }
}

/// An `http` or `https` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl(reqwest::Url);

impl WebhookUrl {
    /// Parses `text`: an `http` URL with a host. `https` is refused until the HTTP client
    /// has a TLS backend (docs/ARCHITECTURE.md, dependency notes), so such a job is a 400
    /// at enqueue rather than a delivery that can never connect.
    pub fn parse(text: &str) -> Result<Self, String> {
        let url = reqwest::Url::parse(text).map_err(|e| format!("`url` is not a URL: {e}"))?;
        if !url.username().is_empty() || url.password().is_some() {
            // Refused rather than stripped: credentials in a URL would reach the records,
            // keys and logs that name it; a receiver's secret belongs in `headers`.
            return Err(
                "`url` must not carry credentials (`user:pass@`); send them in `headers` \
                 (e.g. `Authorization`)"
                    .to_owned(),
            );
        }
        match url.scheme() {
            "http" if url.host().is_some() => Ok(Self(url)),
            "https" => Err("`url`: https is not supported yet (this build has no TLS)".to_owned()),
            scheme => Err(format!("`url` must be http with a host, not `{scheme}:`")),
        }
    }

    /// The URL as text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for WebhookUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for WebhookUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// What a `webhook` job carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookPayload {
    /// Where to POST.
    pub url: WebhookUrl,
    /// The JSON body, sent and signed as its compact serialization.
    pub body: serde_json::Value,
    /// Extra headers (not `webhook-*` nor `content-type`, which the signature owns).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// A delivered webhook: the job's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookDelivered {
    /// The receiver's status (2xx).
    pub status: u16,
    /// The attempt's latency.
    pub latency_ms: u64,
}

/// The `webhook` job type.
#[derive(Debug)]
pub struct WebhookJob {
    client: WebhookClient,
    signer: Signer,
    config: WebhookConfig,
    redis: RedisClient,
    endpoints: Endpoints,
}

impl WebhookJob {
    /// The type for `config`, keeping its breakers and disabled endpoints in `redis`.
    pub fn new(config: &WebhookConfig, redis: RedisClient) -> Result<Self, WebhookError> {
        Self::refusing(config, redis, ClusterAddresses::default())
    }

    /// The type for `config` that also refuses the cluster's own addresses `cluster`.
    pub fn refusing(
        config: &WebhookConfig,
        redis: RedisClient,
        cluster: ClusterAddresses,
    ) -> Result<Self, WebhookError> {
        let signer = Signer::new(&config.secrets)?;
        let policy = EgressPolicy::new(config.allowed_networks.clone()).with_cluster(cluster);
        let client = super::client(config.connect_timeout, policy)?;
        Ok(Self {
            client,
            signer,
            config: config.clone(),
            endpoints: Endpoints::new(redis.clone()),
            redis,
        })
    }

    /// The disabled endpoints this type consults.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    fn breaker(&self, endpoint: &Endpoint) -> CircuitBreaker {
        let name = endpoint.breaker_name();
        CircuitBreaker::new(self.redis.clone(), &name, &self.config.breaker).without_gauge()
    }

    /// Refuses a disabled endpoint before anything is sent.
    async fn check_enabled(&self, ctx: &JobContext, endpoint: &Endpoint) -> Result<(), JobError> {
        let Some(disabled) = self.endpoints.disabled(endpoint).await.map_err(redis)? else {
            return Ok(());
        };
        ctx.note(
            json!({"skipped": "endpoint_disabled", "endpoint": endpoint.url, "since": disabled.at}),
        );
        Err(JobError::permanent(format!(
            "endpoint {endpoint} is disabled since {} ({}); re-enable it with `{}`",
            disabled.at.to_rfc3339(),
            disabled.reason,
            endpoint.enable_command()
        )))
    }

    /// What the attempt's verdict means for the job.
    async fn conclude(
        &self,
        ctx: &JobContext,
        endpoint: &Endpoint,
        attempt: Attempt,
    ) -> Result<WebhookDelivered, JobError> {
        let what = match attempt.status {
            Some(status) => format!("HTTP {status}: {}", attempt.detail),
            None => attempt.detail.clone(),
        };
        match attempt.verdict {
            Verdict::Delivered => Ok(WebhookDelivered {
                status: attempt.status.unwrap_or_default(),
                latency_ms: attempt.latency_ms,
            }),
            Verdict::Retry { after } => Err(JobError::Retryable {
                message: what,
                after: after.map(|after| after.max(self.backoff().delay(ctx.attempt()))),
            }),
            Verdict::Dead | Verdict::Refused => Err(JobError::permanent(what)),
            Verdict::Gone => {
                self.endpoints
                    .disable(endpoint, &what)
                    .await
                    .map_err(redis)?;
                Err(JobError::permanent(format!(
                    "{what} — endpoint {endpoint} is now disabled"
                )))
            }
        }
    }

    fn backoff(&self) -> BackoffPolicy {
        BackoffPolicy {
            first: self.config.backoff_first,
            max: self.config.backoff_max,
            jitter: true,
        }
    }
}

impl JobHandler for WebhookJob {
    const TYPE: &'static str = "webhook";
    type Payload = WebhookPayload;
    type Output = WebhookDelivered;

    fn options(&self) -> JobOptions {
        JobOptions {
            max_attempts: self.config.max_attempts,
            backoff: self.backoff(),
            // The delivery's own timeouts end it first, with a record of why.
            timeout: self.config.connect_timeout
                + self.config.response_timeout
                + Duration::from_secs(5),
            ..JobOptions::default()
        }
    }

    /// At enqueue: the headers, and an IP literal against the egress policy.
    fn check(&self, payload: &WebhookPayload) -> Result<(), String> {
        self.client
            .policy()
            .check_url(&payload.url.0)
            .map_err(|e| format!("`url`: {e}"))?;
        super::check_headers(&header_pairs(payload)).map_err(|e| format!("`headers`: {e}"))
    }

    async fn run(
        &self,
        ctx: &JobContext,
        payload: WebhookPayload,
    ) -> Result<WebhookDelivered, JobError> {
        let endpoint = Endpoint::of(ctx.tenant(), &payload.url.0);
        let body = serde_json::to_string(&payload.body)
            .map_err(|e| JobError::permanent(format!("`body` does not encode: {e}")))?;
        let headers = header_pairs(&payload);
        super::check_headers(&headers).map_err(|e| JobError::permanent(e.to_string()))?;
        self.check_enabled(ctx, &endpoint).await?;
        let breaker = self.breaker(&endpoint);
        let permit = match breaker.admit().await {
            Ok(permit) => permit,
            Err(BreakerError::Open { retry_after, .. }) => {
                let retry_after = retry_after.max(Duration::from_millis(100));
                ctx.note(json!({
                    "skipped": "circuit_open",
                    "endpoint": endpoint.url,
                    "retry_after_ms": retry_after.as_millis() as u64,
                }));
                return Err(JobError::Retryable {
                    message: format!("circuit for {endpoint} is open: not called"),
                    after: Some(retry_after),
                });
            }
            Err(BreakerError::Redis(error)) => return Err(redis(error)),
        };
        let id = ctx.job_id().to_string();
        let delivery = Delivery {
            id: &id,
            url: payload.url.as_str(),
            body: &body,
            headers: &headers,
        };
        let sent = super::attempt(
            &self.client,
            &self.signer,
            &delivery,
            self.config.response_timeout,
        )
        .await;
        let outcome = match &sent {
            Ok(attempt) if counts_against(attempt) => Outcome::Failure,
            _ => Outcome::Success,
        };
        if let Err(error) = breaker.record(permit, outcome).await {
            let endpoint = endpoint.log_name();
            tracing::warn!(%endpoint, %error, "could not record a webhook attempt's outcome");
        }
        let attempt = sent.map_err(|e| JobError::permanent(e.to_string()))?;
        ctx.note(serde_json::to_value(&attempt).unwrap_or_default());
        self.conclude(ctx, &endpoint, attempt).await
    }
}

/// Registers `webhook` in `types` when `config` has secrets (without them a node does not
/// offer the type, and `POST /jobs` answers 400 for it); it then needs `redis`. Its
/// deliveries never reach `cluster`.
pub fn register(
    types: &mut JobRegistry,
    config: &WebhookConfig,
    redis: Option<RedisClient>,
    cluster: ClusterAddresses,
) -> anyhow::Result<()> {
    if config.secrets.is_empty() {
        return Ok(());
    }
    let redis = redis.ok_or_else(|| {
        anyhow::anyhow!("`[jobs.webhook]` has secrets but no Redis is configured (`redis.url`)")
    })?;
    types.register(WebhookJob::refusing(config, redis, cluster)?)?;
    Ok(())
}

fn header_pairs(payload: &WebhookPayload) -> Vec<(String, String)> {
    payload
        .headers
        .iter()
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// Whether an attempt counts against the endpoint's breaker: no answer, 5xx or 408 (an
/// attempt the egress policy stopped reached nobody, so it says nothing of the endpoint).
fn counts_against(attempt: &Attempt) -> bool {
    if attempt.verdict == Verdict::Refused {
        return false;
    }
    match attempt.status {
        None => true,
        Some(status) => status == 408 || status >= 500,
    }
}

fn redis(error: RedisError) -> JobError {
    JobError::retryable(format!("redis: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_decode_and_bad_urls_are_named() {
        let ok: WebhookPayload = serde_json::from_value(json!({
            "url": "http://example.com/hook", "body": {"a": 1}, "headers": {"x-tenant": "t"}
        }))
        .expect("decodes");
        assert_eq!(ok.url.as_str(), "http://example.com/hook");
        for (url, needle) in [
            ("ftp://example.com/x", "must be http"),
            ("not a url", "not a URL"),
            ("https://example.com/x", "no TLS"),
            ("http://user:pass@example.com/x", "credentials"),
            ("http://token@example.com/x", "credentials"),
        ] {
            let error = serde_json::from_value::<WebhookPayload>(json!({"url": url, "body": {}}))
                .expect_err("refused");
            assert!(error.to_string().contains(needle), "{error}");
            assert!(error.to_string().contains("`url`"), "{error}");
        }
        assert!(serde_json::from_value::<WebhookPayload>(json!({"url": "http://a/"})).is_err());
    }

    #[test]
    fn only_silence_5xx_and_408_count_against_the_breaker() {
        let attempt = |status| Attempt {
            verdict: Verdict::Dead,
            status,
            latency_ms: 1,
            detail: String::new(),
            body_bytes: 0,
        };
        assert!(counts_against(&attempt(None)));
        assert!(counts_against(&attempt(Some(503))));
        assert!(counts_against(&attempt(Some(408))));
        assert!(!counts_against(&attempt(Some(429))));
        assert!(!counts_against(&attempt(Some(400))));
        assert!(!counts_against(&attempt(Some(200))));
        let refused = Attempt {
            verdict: Verdict::Refused,
            ..attempt(None)
        };
        assert!(!counts_against(&refused), "nothing was sent");
    }
}
