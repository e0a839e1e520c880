//! Webhook delivery as the Standard Webhooks specification describes it: one signed `POST`
//! and what its outcome means for the next attempt.
//!
//! - **Signing**: `webhook-id` (the same on every attempt, so a receiver drops duplicates),
//!   `webhook-timestamp` (Unix seconds, when this attempt was signed) and
//!   `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, once per configured
//!   secret, space-separated, so a receiver that knows either the old or the new secret
//!   accepts the delivery while secrets rotate. Signatures come from the specification's own
//!   `standardwebhooks` crate; the tests check them with an independent implementation.
//! - **Outcome**: 2xx is delivered. Connection errors, timeouts, 5xx, 408 and 429 are worth
//!   another attempt (429 and 503 honour `Retry-After`). 410 means the endpoint is gone:
//!   dead, and the endpoint should be disabled. Any other 4xx is dead at once (a resend gets
//!   the same answer). Redirects are not followed: a 3xx is dead too (a signed body is not
//!   re-sent to wherever a receiver points).
//! - **Egress**: the client connects only where the [`egress`] policy allows (refused:
//!   dead, without a connection), through no proxy (a proxy would be the address judged).
//! - **Response**: at most [`BODY_CAP`] bytes of the body are read, the first
//!   [`SNIPPET_BYTES`] kept; then the response is dropped (and its connection with it), so
//!   a receiver streaming without end costs the runner one buffer, not the stream.
//! - **Headers**: extra headers may not change the request's framing or routing
//!   ([`FRAMING_HEADERS`], `proxy-*`, `x-shoal-*`) nor the signature's (`webhook-*`,
//!   `content-type`).
//!
//! This module makes one attempt; retries, backoff, the per-endpoint breaker and disabled
//! endpoints belong to the `webhook` job type ([`job`], [`endpoints`]).

pub mod egress;
pub mod endpoints;
pub mod job;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use serde::{Deserialize, Serialize};

/// Most bytes of a response body kept in an attempt's record.
pub const SNIPPET_BYTES: usize = 256;

/// Most bytes of a response body read (64 KiB); the rest is never read.
pub const BODY_CAP: usize = 64 * 1024;

/// Extra headers refused because they change how the request is framed or routed (with
/// every `proxy-*` and `x-shoal-*` header).
pub const FRAMING_HEADERS: [&str; 8] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
];

/// Why a webhook could not be signed or sent as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// A configured secret is not `whsec_` followed by base64.
    #[error("webhook secret {index} is not `whsec_` followed by base64: {problem}")]
    BadSecret {
        /// Its position in `[jobs.webhook] secrets`.
        index: usize,
        /// What is wrong.
        problem: String,
    },
    /// No secret is configured, so nothing could be signed.
    #[error("no webhook signing secret is configured (`[jobs.webhook] secrets`)")]
    NoSecret,
    /// A header the payload asks for cannot be sent.
    #[error("header `{name}` cannot be sent: {problem}")]
    BadHeader {
        /// The header's name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// The payload asks to set a header the signature owns.
    #[error("header `{0}` is set by the signature and cannot be overridden")]
    ReservedHeader(String),
    /// The payload asks to set a header that changes the request's framing or routing.
    #[error("header `{0}` changes the request's framing or routing and cannot be set")]
    FramingHeader(String),
    /// The delivery's URL does not parse.
    #[error("webhook URL `{0}` is not a URL")]
    BadUrl(String),
    /// The HTTP client could not be built (a local problem; retrying does not help).
    #[error("webhook HTTP client: {0}")]
    Client(String),
}

/// The signing secrets, newest first. `Debug` never shows them.
pub struct Signer {
    keys: Vec<standardwebhooks::Webhook>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signer({} secrets)", self.keys.len())
    }
}

impl Signer {
    /// Parses `whsec_…` secrets; at least one is needed.
    pub fn new<S: AsRef<str>>(secrets: &[S]) -> Result<Self, WebhookError> {
        if secrets.is_empty() {
            return Err(WebhookError::NoSecret);
        }
        let keys = secrets
            .iter()
            .enumerate()
            .map(|(index, secret)| {
                let bad = |problem: String| WebhookError::BadSecret { index, problem };
                let encoded = secret
                    .as_ref()
                    .strip_prefix("whsec_")
                    .ok_or_else(|| bad("missing the `whsec_` prefix".to_owned()))?;
                standardwebhooks::Webhook::new(encoded).map_err(|e| bad(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { keys })
    }

    /// The three signature headers for `body` sent as message `id` at `timestamp`.
    pub fn headers(
        &self,
        id: &str,
        timestamp: DateTime<Utc>,
        body: &str,
    ) -> Result<HeaderMap, WebhookError> {
        let seconds = timestamp.timestamp();
        let signatures = self
            .keys
            .iter()
            .map(|key| key.sign(id, seconds, body.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| WebhookError::BadHeader {
                name: "webhook-signature".to_owned(),
                problem: e.to_string(),
            })?
            .join(" ");
        let mut headers = HeaderMap::new();
        for (name, value) in [
            (standardwebhooks::HEADER_WEBHOOK_ID, id.to_owned()),
            (
                standardwebhooks::HEADER_WEBHOOK_TIMESTAMP,
                seconds.to_string(),
            ),
            (standardwebhooks::HEADER_WEBHOOK_SIGNATURE, signatures),
        ] {
            let value = HeaderValue::from_str(&value).map_err(|e| WebhookError::BadHeader {
                name: name.to_owned(),
                problem: e.to_string(),
            })?;
            headers.insert(name, value);
        }
        Ok(headers)
    }
}

/// One delivery to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery<'a> {
    /// The message id (`webhook-id`): the same on every attempt.
    pub id: &'a str,
    /// Where to.
    pub url: &'a str,
    /// The JSON body, exactly as signed.
    pub body: &'a str,
    /// Extra headers.
    pub headers: &'a [(String, String)],
}

/// What one attempt's outcome means for the delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Verdict {
    /// Delivered (2xx).
    Delivered,
    /// Worth another attempt; no earlier than `after` when the receiver said so.
    Retry {
        /// The receiver's `Retry-After`, if it sent one.
        #[serde(
            default,
            with = "humantime_serde",
            skip_serializing_if = "Option::is_none"
        )]
        after: Option<Duration>,
    },
    /// Another attempt gets the same answer.
    Dead,
    /// The endpoint is gone (410): dead, and the endpoint should be disabled.
    Gone,
    /// The egress policy refused every address of the endpoint: nothing was sent, and
    /// another attempt meets the same policy (dead).
    Refused,
}

/// What one attempt did, for the job's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// What to do next.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// The HTTP status, if a response came back.
    pub status: Option<u16>,
    /// From sending to the response's end (or the failure).
    pub latency_ms: u64,
    /// The start of the response body, or what went wrong.
    pub detail: String,
    /// Bytes of the response body read (at most [`BODY_CAP`] and one chunk).
    #[serde(default)]
    pub body_bytes: u64,
}

/// The HTTP client of webhooks and the egress policy it connects under.
#[derive(Debug, Clone)]
pub struct WebhookClient {
    http: reqwest::Client,
    policy: Arc<egress::EgressPolicy>,
}

impl WebhookClient {
    /// The underlying client (its resolver applies the policy; IP literals are checked by
    /// [`attempt`]).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The egress policy.
    pub fn policy(&self) -> &egress::EgressPolicy {
        &self.policy
    }
}

/// Sends one signed attempt through `client` ([`client`]); `timeout` bounds the whole
/// attempt. An address the egress policy refuses ends it without a connection.
pub async fn attempt(
    client: &WebhookClient,
    signer: &Signer,
    delivery: &Delivery<'_>,
    timeout: Duration,
) -> Result<Attempt, WebhookError> {
    let url = reqwest::Url::parse(delivery.url)
        .map_err(|_| WebhookError::BadUrl(delivery.url.to_owned()))?;
    // reqwest does not resolve an IP literal, so the resolver never sees it: judged here.
    if let Err(refused) = client.policy.check_url(&url) {
        return Ok(refused_attempt(refused.to_string(), 0));
    }
    let mut headers = extra_headers(delivery.headers)?;
    headers.extend(signer.headers(delivery.id, Utc::now(), delivery.body)?);
    headers.insert(
        reqwest::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let started = Instant::now();
    let sent = client
        .http
        .post(url)
        .headers(headers)
        .body(delivery.body.to_owned())
        .timeout(timeout)
        .send()
        .await;
    let latency = |started: Instant| u64::try_from(started.elapsed().as_millis()).unwrap_or(0);
    let response = match sent {
        Ok(response) => response,
        Err(error) => {
            if let Some(refused) = egress::name_refused(&error) {
                return Ok(refused_attempt(refused.to_string(), latency(started)));
            }
            if let Some(refused) = egress::connection_refused(&error) {
                return Ok(refused_attempt(refused.to_string(), latency(started)));
            }
            return Ok(Attempt {
                verdict: Verdict::Retry { after: None },
                status: None,
                latency_ms: latency(started),
                detail: describe(&error),
                body_bytes: 0,
            });
        }
    };
    let status = response.status().as_u16();
    let retry_after = retry_after(response.headers());
    // A body that never finishes is cut off by the attempt's timeout.
    let body = read_capped(response, BODY_CAP).await;
    Ok(Attempt {
        verdict: verdict_of(status, retry_after),
        status: Some(status),
        latency_ms: latency(started),
        detail: body.detail(),
        body_bytes: body.read as u64,
    })
}

fn refused_attempt(detail: String, latency_ms: u64) -> Attempt {
    Attempt {
        verdict: Verdict::Refused,
        status: None,
        latency_ms,
        detail: format!("not sent: {detail}"),
        body_bytes: 0,
    }
}

/// The start of a response body read up to a cap.
#[derive(Debug, Default)]
struct CappedBody {
    head: Vec<u8>,
    read: usize,
    cut: bool,
    error: Option<String>,
}

impl CappedBody {
    fn detail(&self) -> String {
        let text = String::from_utf8_lossy(&self.head).into_owned();
        match &self.error {
            Some(error) => format!("response body unreadable: {error}"),
            None if self.cut => format!("{text} (body not read past {} KiB)", BODY_CAP / 1024),
            None => text,
        }
    }
}

/// Reads `response`'s body chunk by chunk until its end or `cap` bytes, keeping the first
/// [`SNIPPET_BYTES`]; the response (and the rest of its body) is dropped unread.
async fn read_capped(mut response: reqwest::Response, cap: usize) -> CappedBody {
    let mut body = CappedBody::default();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = SNIPPET_BYTES.saturating_sub(body.head.len());
                body.head.extend_from_slice(&chunk[..chunk.len().min(room)]);
                body.read += chunk.len();
                if body.read >= cap {
                    body.cut = true;
                    return body;
                }
            }
            Ok(None) => return body,
            Err(error) => {
                body.error = Some(error.to_string());
                return body;
            }
        }
    }
}

/// A client fit for webhooks: no redirects, no proxy, a connect timeout, our user agent,
/// and a resolver that applies `policy`.
pub fn client(
    connect_timeout: Duration,
    policy: egress::EgressPolicy,
) -> Result<WebhookClient, WebhookError> {
    let policy = Arc::new(policy);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(egress::EgressResolver::new(Arc::clone(&policy))))
        .connector_layer(egress::guard::GuardLayer::new(Arc::clone(&policy)))
        .connect_timeout(connect_timeout)
        .user_agent(concat!("shoal-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| WebhookError::Client(e.to_string()))?;
    Ok(WebhookClient { http, policy })
}

/// The verdict a status (and its `Retry-After`) carries.
pub fn verdict_of(status: u16, retry_after: Option<Duration>) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        410 => Verdict::Gone,
        408 | 429 | 500..=599 => Verdict::Retry { after: retry_after },
        _ => Verdict::Dead,
    }
}

/// `Retry-After` as seconds or an HTTP date; absent or unreadable → None.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    (at - Utc::now()).to_std().ok()
}

/// Checks that `pairs` can be sent beside the signature headers.
pub(crate) fn check_headers(pairs: &[(String, String)]) -> Result<(), WebhookError> {
    extra_headers(pairs).map(drop)
}

fn extra_headers(pairs: &[(String, String)]) -> Result<HeaderMap, WebhookError> {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        let bad = |problem: String| WebhookError::BadHeader {
            name: name.clone(),
            problem,
        };
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|e| bad(e.to_string()))?;
        // `HeaderName` is lowercase, so these comparisons ignore the payload's case.
        let lower = header.as_str();
        if lower.starts_with("webhook-") || header == reqwest::header::CONTENT_TYPE {
            return Err(WebhookError::ReservedHeader(header.to_string()));
        }
        if FRAMING_HEADERS.contains(&lower)
            || lower.starts_with("proxy-")
            || lower.starts_with("x-shoal-")
        {
            return Err(WebhookError::FramingHeader(header.to_string()));
        }
        let value = HeaderValue::from_str(value).map_err(|e| bad(e.to_string()))?;
        headers.insert(header, value);
    }
    Ok(headers)
}

fn describe(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    format!("{kind}: {error}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_verdicts() {
        let later = Some(Duration::from_secs(2));
        assert_eq!(verdict_of(204, None), Verdict::Delivered);
        assert_eq!(verdict_of(500, None), Verdict::Retry { after: None });
        assert_eq!(verdict_of(503, later), Verdict::Retry { after: later });
        assert_eq!(verdict_of(429, later), Verdict::Retry { after: later });
        assert_eq!(verdict_of(408, None), Verdict::Retry { after: None });
        assert_eq!(verdict_of(400, None), Verdict::Dead);
        assert_eq!(verdict_of(404, None), Verdict::Dead);
        assert_eq!(verdict_of(301, None), Verdict::Dead);
        assert_eq!(verdict_of(410, None), Verdict::Gone);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        let soon = (Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&soon).expect("a date"));
        let after = retry_after(&headers).expect("a date is read");
        assert!(after > Duration::from_secs(25) && after <= Duration::from_secs(30));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn secrets_must_be_whsec_base64() {
        assert_eq!(
            Signer::new::<&str>(&[]).map(|_| ()),
            Err(WebhookError::NoSecret)
        );
        assert!(matches!(
            Signer::new(&["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]),
            Err(WebhookError::BadSecret { index: 0, .. })
        ));
        assert!(matches!(
            Signer::new(&["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_%%%"]),
            Err(WebhookError::BadSecret { index: 1, .. })
        ));
    }

    #[test]
    fn each_secret_signs_once_and_the_signature_headers_cannot_be_overridden() {
        let signer = Signer::new(&[
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
        ])
        .expect("valid secrets");
        let at = DateTime::from_timestamp(1_614_265_330, 0).expect("a time");
        let headers = signer
            .headers(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                at,
                r#"{"test": 2432232314}"#,
            )
            .expect("signs");
        let signature = headers["webhook-signature"].to_str().expect("ascii");
        // The specification's published example for the first secret.
        assert!(
            signature.starts_with("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE= v1,"),
            "{signature}"
        );
        assert_eq!(signature.split(' ').count(), 2);
        assert_eq!(headers["webhook-timestamp"], "1614265330");
        assert_eq!(
            extra_headers(&[("Webhook-Signature".into(), "v1,forged".into())]),
            Err(WebhookError::ReservedHeader("webhook-signature".into()))
        );
    }

    #[test]
    fn headers_that_change_framing_or_routing_are_refused_in_any_case() {
        for name in [
            "Host",
            "content-length",
            "Transfer-Encoding",
            "CONNECTION",
            "Upgrade",
            "TE",
            "Trailer",
            "Keep-Alive",
            "Proxy-Authorization",
            "proxy-connection",
            "X-Shoal-Secret",
            "x-shoal-cluster-secret",
        ] {
            let refused = extra_headers(&[(name.into(), "x".into())]);
            assert_eq!(
                refused,
                Err(WebhookError::FramingHeader(name.to_ascii_lowercase())),
                "{name}"
            );
        }
        for name in ["webhook-id", "Webhook-Timestamp", "WEBHOOK-SIGNATURE"] {
            assert!(
                matches!(
                    extra_headers(&[(name.into(), "x".into())]),
                    Err(WebhookError::ReservedHeader(_))
                ),
                "{name}"
            );
        }
        let fine = extra_headers(&[
            ("Authorization".into(), "Bearer t".into()),
            ("X-Tenant".into(), "acme".into()),
            ("x-shoalish".into(), "ok".into()),
        ]);
        assert_eq!(fine.map(|h| h.len()), Ok(3));
    }
}
