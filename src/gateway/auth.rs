//! Optional bearer-token auth for the whole gateway (`[gateway.auth]`).
//!
//! When on, every request but the operational routes (`/health`, `/ready`, `/metrics`,
//! `/openapi.json`) needs `Authorization: Bearer <JWT>`. The token is verified by
//! `jsonwebtoken` with the configured keys (an HS256 secret; RS256 and EdDSA public keys
//! from a JWKS file, picked by `kid`), with `exp` required and `iss`/`aud` checked when
//! configured, within the configured clock skew. The tenant is the token's
//! `tenant-claim`: it is written into `X-Tenant-Id` (so the rate limits and every route
//! see the same tenant) and handed to handlers as a [`Principal`] extension. A request
//! whose own `X-Tenant-Id` names another tenant is refused with 403, not silently
//! rewritten. Failures are 401 (`WWW-Authenticate: Bearer`) and never say which check
//! failed beyond the error's code.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::ApiError;
use crate::config::AuthConfig;

/// Who a verified token says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The tenant (the token's tenant claim).
    pub tenant: String,
    /// The token's `sub`, if any.
    pub subject: Option<String>,
    /// Whether the token carries the operator scope ([`OPERATOR_SCOPE`] in its `scope`
    /// claim): the generic entity routes then reach every type, internal ones included,
    /// and every tenant's ids.
    pub operator: bool,
}

/// The scope (in the space-separated `scope` claim) that makes a token an operator's.
pub const OPERATOR_SCOPE: &str = "shoal:operator";

struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// The verifier built from `[gateway.auth]` at start-up.
pub(crate) struct Verifier {
    keys: Vec<Key>,
    config: AuthConfig,
}

/// The middleware's state: the verifier (`None`: auth is off) and the event-stream routes
/// (matched paths), the only ones that take `?access_token=`.
#[derive(Debug, Clone)]
pub(crate) struct Gate {
    pub(crate) verifier: Option<Arc<Verifier>>,
    pub(crate) streams: Arc<[String]>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

const OPEN: &[&str] = &["/health", "/ready", "/metrics", "/openapi.json"];

/// Whether `path` is an operational route, open without a token.
pub(crate) fn is_open(path: &str) -> bool {
    OPEN.contains(&path)
}
const TENANT: &str = "x-tenant-id";

impl Verifier {
    /// The verifier for `config`, `None` when auth is off.
    pub(crate) fn new(config: &AuthConfig) -> Result<Option<Self>, String> {
        if !config.enabled {
            return Ok(None);
        }
        let mut keys = Vec::new();
        if let Some(secret) = &config.hs256_secret {
            keys.push(Key {
                kid: None,
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.as_bytes())
                    .map_err(|e| format!("gateway.auth.hs256-secret: {e}"))?,
            });
        }
        if let Some(path) = &config.jwks_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("gateway.auth.jwks-file {}: {e}", path.display()))?;
            let set: JwkSet = serde_json::from_str(&text)
                .map_err(|e| format!("gateway.auth.jwks-file {}: {e}", path.display()))?;
            for jwk in &set.keys {
                let algorithm = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                    _ => {
                        return Err(format!(
                            "gateway.auth.jwks-file {}: only RSA (RS256) and Ed25519 (EdDSA) keys are accepted",
                            path.display()
                        ));
                    }
                };
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| format!("gateway.auth.jwks-file {}: {e}", path.display()))?;
                keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    algorithm,
                    key,
                });
            }
        }
        if keys.is_empty() {
            return Err("gateway.auth is enabled but has no keys".to_owned());
        }
        Ok(Some(Self {
            keys,
            config: config.clone(),
        }))
    }

    /// The principal of a bearer token, or why it is refused.
    pub(crate) fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        self.verify_within(token, None)
    }

    /// [`Self::verify`], and, given `max_lifetime`, a token whose `exp` is further than
    /// that from now is refused too.
    fn verify_within(
        &self,
        token: &str,
        max_lifetime: Option<std::time::Duration>,
    ) -> Result<Principal, ApiError> {
        // The answer never says which check failed (that would guide a forger); the log
        // does, at debug.
        let invalid = |reason: String| {
            tracing::debug!(%reason, "token refused");
            ApiError::Unauthorized {
                code: "invalid_token",
                message: "the bearer token is not valid for this gateway".to_owned(),
            }
        };
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| invalid(format!("the token: {e}")))?;
        let key = self
            .keys
            .iter()
            .find(|k| {
                k.algorithm == header.alg
                    && (header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
            })
            .ok_or_else(|| {
                invalid(format!(
                    "no key for algorithm {:?} and this kid",
                    header.alg
                ))
            })?;
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = self.config.leeway().as_secs();
        validation.validate_nbf = true;
        // A configured `iss` or `aud` is required, not only checked when present.
        let mut required = vec!["exp"];
        if let Some(issuer) = &self.config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &self.config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let claims = jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &validation)
            .map_err(|e| invalid(format!("the token: {e}")))?
            .claims;
        if let Some(max) = max_lifetime {
            let left = claims
                .get("exp")
                .and_then(serde_json::Value::as_i64)
                .map(|exp| exp - chrono::Utc::now().timestamp());
            let max = i64::try_from(max.as_secs()).unwrap_or(i64::MAX);
            if left.is_none_or(|left| left > max) {
                return Err(ApiError::Unauthorized {
                    code: "long_lived_query_token",
                    message: format!(
                        "a token in `?access_token=` must expire within {max} s \
                         (`[gateway.auth] query-token-max-lifetime`); send a longer-lived \
                         one as `Authorization: Bearer`"
                    ),
                });
            }
        }
        let claim = self.config.tenant_claim();
        let tenant = claims
            .get(claim)
            .and_then(serde_json::Value::as_str)
            .filter(|t| super::rate_limit::valid_tenant(t))
            .ok_or_else(|| invalid(format!("the token has no valid `{claim}` claim")))?;
        let operator = claims
            .get("scope")
            .and_then(serde_json::Value::as_str)
            .is_some_and(|scope| scope.split_ascii_whitespace().any(|s| s == OPERATOR_SCOPE));
        Ok(Principal {
            tenant: tenant.to_owned(),
            subject: claims
                .get("sub")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
            operator,
        })
    }
}

/// The middleware: passes requests through when auth is off (an event stream's
/// `?access_token=` is taken out all the same, so a web app works either way).
pub(crate) async fn enforce(
    State(gate): State<Gate>,
    mut request: Request,
    next: Next,
) -> Response {
    let on_stream = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .is_some_and(|route| gate.streams.iter().any(|s| s == route.as_str()));
    let token = on_stream.then(|| query_token(&mut request)).flatten();
    let Some(verifier) = gate.verifier else {
        return next.run(request).await;
    };
    if OPEN.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let principal = match authenticate(&verifier, &request, token) {
        Ok(principal) => principal,
        Err(error) => return error.into_response(),
    };
    let Ok(value) = HeaderValue::from_str(&principal.tenant) else {
        return ApiError::Internal("a verified tenant is not a header value".to_owned())
            .into_response();
    };
    request.headers_mut().insert(TENANT, value);
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// The paths of OpenAPI document `doc` whose `GET` answers `text/event-stream`.
pub(crate) fn streams_in(doc: &serde_json::Value) -> Vec<String> {
    doc["paths"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, operations)| {
            operations["get"]["responses"]["200"]["content"]
                .get("text/event-stream")
                .is_some()
        })
        .map(|(path, _)| path.clone())
        .collect()
}

/// The query parameter an `EventSource` passes its token in.
const QUERY_TOKEN: &str = "access_token";

/// The token in the query of a `GET` to an event-stream route (the caller checks the
/// route), taken out of the URI (so no handler or log sees it), when the request has no
/// `Authorization`.
fn query_token(request: &mut Request) -> Option<String> {
    if request.method() != axum::http::Method::GET
        || request
            .headers()
            .contains_key(axum::http::header::AUTHORIZATION)
    {
        return None;
    }
    let query = request.uri().query()?;
    let mut token = None;
    let mut rest = form_urlencoded::Serializer::new(String::new());
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name == QUERY_TOKEN {
            token = Some(value.into_owned());
        } else {
            rest.append_pair(&name, &value);
        }
    }
    let token = token?;
    let rest = rest.finish();
    let path_and_query = if rest.is_empty() {
        request.uri().path().to_owned()
    } else {
        format!("{}?{rest}", request.uri().path())
    };
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    if let Ok(uri) = axum::http::Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
    Some(token)
}

fn authenticate(
    verifier: &Verifier,
    request: &Request,
    query_token: Option<String>,
) -> Result<Principal, ApiError> {
    if let Some(token) = query_token {
        let max = verifier.config.query_token_max_lifetime;
        let principal = verifier.verify_within(&token, Some(max))?;
        return check_tenant_header(request, principal);
    }
    let header = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .ok_or(ApiError::Unauthorized {
            code: "missing_token",
            message: "this gateway needs `Authorization: Bearer <token>`".to_owned(),
        })?;
    let token = header
        .to_str()
        .ok()
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(ApiError::Unauthorized {
            code: "missing_token",
            message: "`Authorization` must be `Bearer <token>`".to_owned(),
        })?;
    let principal = verifier.verify(token)?;
    check_tenant_header(request, principal)
}

/// Refuses an `X-Tenant-Id` naming another tenant than the token's.
fn check_tenant_header(request: &Request, principal: Principal) -> Result<Principal, ApiError> {
    if let Some(asked) = request.headers().get(TENANT)
        && asked.as_bytes() != principal.tenant.as_bytes()
    {
        return Err(ApiError::Forbidden {
            code: "wrong_tenant",
            message: "`X-Tenant-Id` names a tenant other than the token's".to_owned(),
        });
    }
    Ok(principal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn verifier() -> Verifier {
        let config = AuthConfig {
            enabled: true,
            hs256_secret: Some(SECRET.to_owned()),
            issuer: Some("https://issuer.example".to_owned()),
            audience: Some("shoal".to_owned()),
            ..AuthConfig::default()
        };
        Verifier::new(&config)
            .expect("a verifier")
            .expect("auth is on")
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()).expect("a key"),
        )
        .expect("a token")
    }

    fn claims(exp_offset: i64) -> serde_json::Value {
        let now = chrono::Utc::now().timestamp();
        serde_json::json!({
            "iss": "https://issuer.example", "aud": "shoal", "tenant": "acme",
            "sub": "u1", "exp": now + exp_offset,
        })
    }

    #[test]
    fn a_query_token_must_be_short_lived_and_is_taken_out_of_the_uri() {
        let verifier = verifier();
        let five_minutes = Some(std::time::Duration::from_secs(300));
        assert!(
            verifier
                .verify_within(&token(claims(60), SECRET), five_minutes)
                .is_ok()
        );
        let long = verifier.verify_within(&token(claims(3600), SECRET), five_minutes);
        assert!(
            matches!(
                long,
                Err(ApiError::Unauthorized {
                    code: "long_lived_query_token",
                    ..
                })
            ),
            "{long:?}"
        );
        // Only for GET, only without `Authorization` (the route is checked by `enforce`).
        let request = |method: &str, uri: &str| {
            Request::builder()
                .method(method)
                .uri(uri)
                .body(axum::body::Body::empty())
                .expect("a request")
        };
        let mut get = request("GET", "/tenants/a/events?topics=x&access_token=t1");
        assert_eq!(query_token(&mut get).as_deref(), Some("t1"));
        assert_eq!(get.uri().to_string(), "/tenants/a/events?topics=x");
        let mut post = request("POST", "/tenants/a/events?access_token=t1");
        assert_eq!(query_token(&mut post), None);
        let mut bearer = request("GET", "/tenants/a/events?access_token=t1");
        bearer
            .headers_mut()
            .insert("authorization", HeaderValue::from_static("Bearer x"));
        assert_eq!(query_token(&mut bearer), None);
    }

    #[test]
    fn a_valid_token_names_its_tenant() {
        let principal = verifier()
            .verify(&token(claims(60), SECRET))
            .expect("valid");
        assert_eq!(principal.tenant, "acme");
        assert_eq!(principal.subject.as_deref(), Some("u1"));
    }

    #[test]
    fn expired_forged_and_foreign_tokens_are_refused() {
        let verifier = verifier();
        // Past the 30 s leeway.
        assert!(verifier.verify(&token(claims(-120), SECRET)).is_err());
        // Inside it.
        assert!(verifier.verify(&token(claims(-10), SECRET)).is_ok());
        let forged = token(claims(60), "another-secret-another-secret-xx");
        assert!(verifier.verify(&forged).is_err());
        let mut other = claims(60);
        other["aud"] = "someone-else".into();
        assert!(verifier.verify(&token(other, SECRET)).is_err());
        let mut other = claims(60);
        other["iss"] = "https://evil.example".into();
        assert!(verifier.verify(&token(other, SECRET)).is_err());
        let mut other = claims(60);
        other["tenant"] = "no spaces allowed".into();
        assert!(verifier.verify(&token(other, SECRET)).is_err());
        assert!(verifier.verify("not-a-jwt").is_err());
    }

    #[test]
    fn configured_issuer_and_audience_are_required_and_nbf_is_checked() {
        let verifier = verifier();
        for missing in ["iss", "aud"] {
            let mut other = claims(60);
            other.as_object_mut().expect("an object").remove(missing);
            let refused = verifier.verify(&token(other, SECRET));
            assert!(refused.is_err(), "a token without `{missing}`");
        }
        let mut early = claims(3600);
        early["nbf"] = (chrono::Utc::now().timestamp() + 365 * 24 * 3600).into();
        let refused = verifier
            .verify(&token(early, SECRET))
            .expect_err("not yet valid");
        // The answer does not say which check failed.
        assert_eq!(
            refused.to_string(),
            verifier
                .verify(&token(claims(60), "another-secret-another-secret-xx"))
                .expect_err("forged")
                .to_string()
        );
        let mut soon = claims(3600);
        soon["nbf"] = (chrono::Utc::now().timestamp() + 10).into();
        assert!(
            verifier.verify(&token(soon, SECRET)).is_ok(),
            "within the leeway"
        );
    }

    #[test]
    fn the_operator_scope_makes_an_operator() {
        let verifier = verifier();
        assert!(
            !verifier
                .verify(&token(claims(60), SECRET))
                .expect("valid")
                .operator
        );
        let mut operator = claims(60);
        operator["scope"] = "read shoal:operator".into();
        assert!(
            verifier
                .verify(&token(operator, SECRET))
                .expect("valid")
                .operator
        );
        let mut lookalike = claims(60);
        lookalike["scope"] = "shoal:operators".into();
        assert!(
            !verifier
                .verify(&token(lookalike, SECRET))
                .expect("valid")
                .operator
        );
    }
}
