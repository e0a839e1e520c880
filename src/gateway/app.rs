//! Routes from the application: an application hands the gateway [`AppRouter`]s
//! (`utoipa_axum::router::OpenApiRouter`s over [`GatewayContext`]), and the gateway serves
//! them beside its own routes, behind the same middleware (request id, rate limits under
//! the `applications` group, body limit, graceful shutdown) and lists their operations in
//! `/openapi.json`.
//!
//! The runtime knows nothing of what the routes do: a handler reaches entities only
//! through the [`ShoalClient`] of its [`GatewayContext`], and answers failures with
//! [`ApiError`] (so every error has the gateway's JSON shape). [`JsonBody`] is the JSON
//! extractor whose rejections are `ApiError`s; path and query rejections convert with `?`.
//!
//! Application paths may not use the gateway's own: `/entities/...`, `/cluster`, `/cron`,
//! `/health`, `/ready`, `/metrics` and `/openapi.json` are refused at start-up, as is a
//! path two application routers both declare.

use std::collections::BTreeSet;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use utoipa_axum::router::OpenApiRouter;

use super::{ApiError, GatewayError};
use crate::client::ShoalClient;

/// An application's routes and their OpenAPI description (add handlers annotated with
/// `#[utoipa::path]` through `utoipa_axum::routes!`, so each route is documented where it
/// is routed).
pub type AppRouter = OpenApiRouter<GatewayContext>;

/// What an application's handlers are given as state (`State<GatewayContext>`).
#[derive(Debug, Clone)]
pub struct GatewayContext {
    client: ShoalClient,
}

impl GatewayContext {
    pub(crate) fn new(client: ShoalClient) -> Self {
        Self { client }
    }

    /// The gateway's cluster client: the one way a route reaches entities.
    pub fn client(&self) -> &ShoalClient {
        &self.client
    }
}

/// Paths (and prefixes, ending in `/`) the gateway keeps for itself.
const RESERVED: &[&str] = &[
    "/entities/",
    "/cluster",
    "/cron",
    "/health",
    "/ready",
    "/metrics",
    "/openapi.json",
];

/// Whether `path` is, or lies under, one of the gateway's own routes.
pub(crate) fn is_reserved(path: &str) -> bool {
    RESERVED.iter().any(|reserved| {
        if reserved.ends_with('/') {
            path.starts_with(reserved) || path == reserved.trim_end_matches('/')
        } else {
            path == *reserved || path.starts_with(&format!("{reserved}/"))
        }
    })
}

/// `/a/{x}/b` and `/a/{y}/b` are the same route to the router.
fn route_shape(path: &str) -> String {
    path.split('/')
        .map(|segment| {
            if segment.starts_with('{') {
                "{}"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Refuses application routes on the gateway's own paths, and paths two routers both
/// declare (checked before the gateway starts anything).
pub(crate) fn check(routers: &[AppRouter]) -> Result<(), GatewayError> {
    let mut seen = BTreeSet::new();
    for router in routers {
        for path in router.get_openapi().paths.paths.keys() {
            if is_reserved(path) {
                return Err(GatewayError::Setup(format!(
                    "application route `{path}` uses a path the gateway keeps for itself"
                )));
            }
            if !seen.insert(route_shape(path)) {
                return Err(GatewayError::Setup(format!(
                    "application route `{path}` is declared by two routers"
                )));
            }
        }
    }
    Ok(())
}

/// The application's routers bound to `context`, as one router (after [`check`]).
pub(crate) fn compose(routers: Vec<AppRouter>, context: &GatewayContext) -> Router {
    routers.into_iter().fold(Router::new(), |router, app| {
        router.merge(Router::from(app.with_state::<()>(context.clone())))
    })
}

/// A JSON request body of type `T`: a JSON object. Its rejections are [`ApiError`]s: 413
/// over the body limit, 400 `malformed_json` for text that is not JSON, 400 `bad_body` for
/// a body that is not an object or names the field that does not match `T`. Numbers
/// without a fraction are integers (`2.0` is 2). A nested struct field of `T` should
/// use [`object_only`] so it is not read from an array.
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(body_rejection)?;
        let mut value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|error| {
            ApiError::bad_request(
                "malformed_json",
                format!("the body is not valid JSON: {error}"),
            )
        })?;
        // A body is an object: serde would also read a struct from an array of its fields.
        if !value.is_object() {
            return Err(ApiError::bad_request(
                "bad_body",
                "the body must be a JSON object",
            ));
        }
        integral_numbers(&mut value);
        serde_path_to_error::deserialize(value)
            .map(JsonBody)
            .map_err(|error| {
                let field = error.path().to_string();
                let error = error.into_inner();
                if field == "." {
                    ApiError::bad_request("bad_body", error.to_string())
                } else {
                    ApiError::bad_request("bad_body", format!("field `{field}`: {error}"))
                }
            })
    }
}

/// `#[serde(deserialize_with = "shoal::gateway::object_only")]` for a struct field (or an
/// `Option` of one, with `default`) of a request body: only a JSON object (or `null`) is
/// taken, not the array of its fields serde would also read.
pub fn object_only<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: DeserializeOwned,
{
    use serde::Deserialize;
    use serde::de::Error;
    let value = serde_json::Value::deserialize(deserializer)?;
    if value.is_array() {
        return Err(D::Error::custom("expected an object, not an array"));
    }
    serde_json::from_value(value).map_err(D::Error::custom)
}

/// Writes every number of `value` that has no fraction as an integer: in JSON (and JSON
/// Schema's `integer`) `2.0` is the integer 2, which a Rust integer field should take.
/// (serde_json's parser bounds the nesting, so the recursion is bounded.)
pub(crate) fn integral_numbers(value: &mut serde_json::Value) {
    use serde_json::Value;
    /// 2^53: up to here every integer is exactly a float, so the float is the integer the
    /// text wrote (past it, `-9223372036854775809` would round into `i64`'s range).
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match value {
        Value::Number(number) => {
            let Some(float) = number.as_f64().filter(|_| number.is_f64()) else {
                return;
            };
            if float.fract() == 0.0 && float.abs() <= EXACT {
                *value = Value::from(float as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_numbers),
        Value::Object(fields) => fields.values_mut().for_each(integral_numbers),
        _ => {}
    }
}

fn body_rejection(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge("the body is over the gateway's limit".to_owned())
    } else {
        ApiError::bad_request("bad_body", rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::bad_request("bad_path", rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request("bad_query", rejection.body_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_without_a_fraction_are_integers() {
        let mut value: serde_json::Value = serde_json::from_str(
            r#"{"a": 2.0, "b": [-3.0, 1.5, 1e300, -9223372036854775809], "c": 7, "d": -0.0}"#,
        )
        .expect("JSON");
        integral_numbers(&mut value);
        assert_eq!(
            value,
            serde_json::json!({"a": 2, "b": [-3, 1.5, 1e300, -9.223372036854776e18], "c": 7, "d": 0})
        );
        let by: i64 = serde_json::from_value(value["b"][0].clone()).expect("an i64");
        assert_eq!(by, -3);
    }

    #[test]
    fn the_gateways_own_paths_are_reserved() {
        for path in [
            "/entities/counter/a/increment",
            "/entities",
            "/cluster",
            "/cron",
            "/health",
            "/ready/more",
            "/metrics",
            "/openapi.json",
        ] {
            assert!(is_reserved(path), "{path}");
        }
        for path in ["/jobs", "/clusters", "/tenants/{t}/events", "/entitiesx"] {
            assert!(!is_reserved(path), "{path}");
        }
    }

    fn declaring(path: &str) -> AppRouter {
        let doc = serde_json::json!({
            "openapi": "3.1.0",
            "info": {"title": "t", "version": "1"},
            "paths": {path: {"get": {"responses": {}}}},
        });
        OpenApiRouter::with_openapi(serde_json::from_value(doc).expect("a document"))
    }

    #[test]
    fn reserved_and_doubly_declared_paths_are_refused() {
        assert!(check(&[declaring("/jobs/{id}"), declaring("/extractions")]).is_ok());
        let twice = check(&[declaring("/jobs/{id}"), declaring("/jobs/{job}")]);
        assert!(
            matches!(&twice, Err(GatewayError::Setup(m)) if m.contains("two routers")),
            "{twice:?}"
        );
        let own = check(&[declaring("/entities/{t}/{id}/go")]);
        assert!(
            matches!(&own, Err(GatewayError::Setup(m)) if m.contains("keeps for itself")),
            "{own:?}"
        );
    }

    #[test]
    fn parameter_names_do_not_make_routes_different() {
        assert_eq!(route_shape("/a/{x}/b"), route_shape("/a/{y}/b"));
        assert_ne!(route_shape("/a/{x}/b"), route_shape("/a/{x}/c"));
    }
}
