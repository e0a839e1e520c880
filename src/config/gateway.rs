//! `[gateway]`, `[gateway.auth]` and `[gateway.cors]`: the HTTP front door, its token
//! checks and the browser origins it serves.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[gateway]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address the gateway listens on. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Deadline of a request without `X-Request-Timeout`. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Largest request body accepted, in bytes. Default 1048576.
    pub max_body_bytes: usize,
    /// `/ready` turns red while an owned shard has an unprocessed message older than this.
    /// Default `30s`.
    #[serde(with = "humantime_serde")]
    pub ready_max_backlog_age: Duration,
    /// Time in-flight requests get to finish on shutdown. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Connections open at once; accepting pauses at the cap. Default 4096.
    pub max_connections: usize,
    /// Connections open at once from one IP address; more are closed. Default 1024 (behind
    /// a load balancer every client has its address: raise it to `max-connections`).
    pub max_connections_per_client: usize,
    /// How long a new connection may take to send its first request's head; then it is
    /// closed (slowloris). Default `10s`.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// `[gateway.auth]`: bearer-token (JWT) auth for every route. Off by default.
    pub auth: AuthConfig,
    /// `[gateway.cors]`: the browser origins granted cross-origin access. None by default.
    pub cors: CorsConfig,
}

/// `[gateway.cors]`: web apps served from these origins may call every route and open
/// the event streams from the browser (preflights answered, `Retry-After`, `Location`,
/// `X-Request-Id` and `WWW-Authenticate` readable). No credentials mode: a browser sends
/// its token as `Authorization`, or an `EventSource` as `?access_token=` (see
/// `[gateway.auth] query-token-max-lifetime`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Exact origins, `scheme://host[:port]` (e.g. `https://app.example`). Default none:
    /// no cross-origin grants.
    pub allowed_origins: Vec<String>,
    /// How long a browser may cache a preflight's answer. Default `10m`.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for CorsConfig {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            max_age: Duration::from_secs(600),
        }
    }
}

impl CorsConfig {
    /// Most origins listed.
    pub const MAX_ORIGINS: usize = 64;

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |problem: String| ConfigError::Invalid {
            key: "gateway.cors.allowed-origins",
            problem,
        };
        if self.allowed_origins.len() > Self::MAX_ORIGINS {
            return Err(invalid(format!("at most {} origins", Self::MAX_ORIGINS)));
        }
        for origin in &self.allowed_origins {
            check_origin(origin).map_err(|why| invalid(format!("`{origin}`: {why}")))?;
        }
        Ok(())
    }
}

/// Whether `origin` is what a browser sends as `Origin`: `http` or `https`, a host, an
/// optional port, nothing else (no path, no trailing `/`, no `*`).
fn check_origin(origin: &str) -> Result<(), &'static str> {
    if origin.contains('*') {
        return Err("wildcards are not allowed; list each origin");
    }
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or("must start with `https://` or `http://`")?;
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return Err("must be `scheme://host[:port]` with no path, query or user");
    }
    if !rest.is_ascii() || rest.chars().any(|c| c.is_ascii_uppercase()) {
        return Err("must be lowercase ASCII, as browsers send it (punycode for IDNs)");
    }
    if let Some((_, port)) = rest.rsplit_once(':')
        && !rest.ends_with(']')
        && port.parse::<u16>().is_err()
    {
        return Err("the port must be a number up to 65535");
    }
    Ok(())
}

/// `[gateway.auth]`: every route but `/health`, `/ready`, `/metrics` and `/openapi.json`
/// needs `Authorization: Bearer <JWT>`, verified with the configured keys; the request's
/// tenant is then the token's (`tenant-claim`), and an `X-Tenant-Id` naming another
/// tenant is refused (403). Off by default (local clusters, `shoal dev`); turn it on in
/// production.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Whether tokens are required. Default `false`.
    pub enabled: bool,
    /// An HS256 secret (tokens signed with it are accepted). Default none.
    pub hs256_secret: Option<String>,
    /// A JWKS file of public keys: RSA keys accept RS256, Ed25519 (OKP) keys EdDSA; a
    /// token's `kid` picks its key. Default none.
    pub jwks_file: Option<std::path::PathBuf>,
    /// The required `iss`. Default none (not checked).
    pub issuer: Option<String>,
    /// The required `aud`. Default none (not checked).
    pub audience: Option<String>,
    /// The claim that names the tenant. Default `tenant`.
    pub tenant_claim: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`. Default `30s`.
    #[serde(with = "humantime_serde::option")]
    pub leeway: Option<Duration>,
    /// Longest lifetime left (`exp` minus now) of a token passed as `?access_token=`,
    /// which only the event-stream routes take (a browser's `EventSource` cannot set
    /// `Authorization`; a URL is seen by more than a header, so such tokens must be
    /// short-lived). Default `5m`.
    #[serde(with = "humantime_serde")]
    pub query_token_max_lifetime: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            hs256_secret: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            tenant_claim: None,
            leeway: None,
            query_token_max_lifetime: Duration::from_secs(300),
        }
    }
}

impl AuthConfig {
    /// The claim that names the tenant.
    pub fn tenant_claim(&self) -> &str {
        self.tenant_claim.as_deref().unwrap_or("tenant")
    }

    /// The clock skew allowed.
    pub fn leeway(&self) -> Duration {
        self.leeway.unwrap_or(Duration::from_secs(30))
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled && self.hs256_secret.is_none() && self.jwks_file.is_none() {
            return Err(ConfigError::Invalid {
                key: "gateway.auth",
                problem: "is enabled but has neither hs256-secret nor jwks-file".to_owned(),
            });
        }
        if self.hs256_secret.as_ref().is_some_and(|s| s.len() < 32) {
            return Err(ConfigError::Invalid {
                key: "gateway.auth.hs256-secret",
                problem: "must be at least 32 bytes".to_owned(),
            });
        }
        Ok(())
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 1 << 20,
            ready_max_backlog_age: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_connections_per_client: 1024,
            header_read_timeout: Duration::from_secs(10),
            auth: AuthConfig::default(),
            cors: CorsConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_exact_and_as_browsers_send_them() {
        for good in [
            "https://app.example",
            "http://localhost:5173",
            "http://127.0.0.1:8080",
            "http://[::1]:3000",
        ] {
            assert_eq!(check_origin(good), Ok(()), "{good}");
        }
        for bad in [
            "*",
            "https://*.example",
            "app.example",
            "https://app.example/",
            "https://app.example/path",
            "https://App.Example",
            "https://app.example:99999",
            "ftp://app.example",
            "https://",
        ] {
            assert!(check_origin(bad).is_err(), "{bad}");
        }
    }
}
