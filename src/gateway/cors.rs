//! Cross-origin access for web apps on the origins `[gateway.cors]` lists: preflights
//! are answered (before auth and rate limits, which a preflight cannot satisfy), and every
//! answer to an allowed origin, errors included, carries `Access-Control-Allow-Origin` and
//! exposes the headers a client acts on. An origin not listed gets no grant, so the
//! browser keeps the answer from its page.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::Response;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::CorsConfig;

/// The request headers a route may take.
pub(crate) const ALLOWED_HEADERS: [HeaderName; 7] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    HeaderName::from_static("idempotency-key"),
    HeaderName::from_static("last-event-id"),
    HeaderName::from_static("x-request-timeout"),
    HeaderName::from_static("x-tenant-id"),
    HeaderName::from_static("x-request-id"),
];

/// The response headers a cross-origin page may read.
pub(crate) const EXPOSED_HEADERS: [HeaderName; 4] = [
    header::RETRY_AFTER,
    header::LOCATION,
    header::WWW_AUTHENTICATE,
    HeaderName::from_static("x-request-id"),
];

/// `[gateway.cors]` as the router applies it: tower-http's layer grants origins and
/// answers preflights, and [`per_path`] narrows a preflight's methods to its path's.
#[derive(Clone)]
pub(crate) struct Cors {
    pub(crate) layer: CorsLayer,
    pub(crate) paths: Arc<PathMethods>,
}

impl Cors {
    /// The CORS of a gateway serving OpenAPI document `doc`, or `None` when `config`
    /// lists no origin.
    pub(crate) fn new(config: &CorsConfig, doc: &serde_json::Value) -> Option<Self> {
        let paths = PathMethods::of(doc);
        Some(Self {
            layer: layer(config, paths.all())?,
            paths: Arc::new(paths),
        })
    }
}

/// The methods of each path template of the document (`{…}` is one segment).
#[derive(Debug, Default)]
pub(crate) struct PathMethods {
    templates: Vec<(Vec<String>, Vec<Method>)>,
}

impl PathMethods {
    fn of(doc: &serde_json::Value) -> Self {
        let templates = doc["paths"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(path, item)| {
                let segments = path.split('/').map(str::to_owned).collect();
                let methods = item
                    .as_object()
                    .into_iter()
                    .flat_map(|operations| operations.keys())
                    .filter_map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok())
                    .collect();
                (segments, methods)
            })
            .collect();
        Self { templates }
    }

    /// Every method some path takes.
    fn all(&self) -> Vec<Method> {
        let mut methods: Vec<Method> = self
            .templates
            .iter()
            .flat_map(|(_, methods)| methods.iter().cloned())
            .collect();
        methods.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        methods.dedup();
        methods
    }

    /// The methods of every template `path` matches, as `Access-Control-Allow-Methods`;
    /// `None` when none does.
    fn allow_methods(&self, path: &str) -> Option<HeaderValue> {
        let segments: Vec<&str> = path.split('/').collect();
        let mut methods: Vec<&str> = self
            .templates
            .iter()
            .filter(|(template, _)| {
                template.len() == segments.len()
                    && template.iter().zip(&segments).all(|(t, s)| {
                        (t.starts_with('{') && t.ends_with('}') && !s.is_empty()) || t == s
                    })
            })
            .flat_map(|(_, methods)| methods.iter().map(Method::as_str))
            .collect();
        methods.sort_unstable();
        methods.dedup();
        (!methods.is_empty())
            .then(|| HeaderValue::from_str(&methods.join(",")).ok())
            .flatten()
    }
}

/// Narrows a preflight's `Access-Control-Allow-Methods` to the methods its path takes
/// (and drops it for a path no route has), outside tower-http's layer.
pub(crate) async fn per_path(
    State(paths): State<Arc<PathMethods>>,
    request: Request,
    next: Next,
) -> Response {
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let allowed = preflight.then(|| paths.allow_methods(request.uri().path()));
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    match allowed {
        Some(_) if !headers.contains_key(header::ACCESS_CONTROL_ALLOW_METHODS) => {}
        Some(Some(methods)) => {
            headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, methods);
        }
        Some(None) => {
            headers.remove(header::ACCESS_CONTROL_ALLOW_METHODS);
        }
        None => {}
    }
    response
}

/// The layer for `config`, or `None` when no origin is listed. `methods` are the methods
/// the routes take (from the route table and the OpenAPI document).
fn layer(config: &CorsConfig, methods: Vec<Method>) -> Option<CorsLayer> {
    if config.allowed_origins.is_empty() {
        return None;
    }
    let origins: Arc<[HeaderValue]> = config
        .allowed_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::predicate(move |origin, _| {
                origins.contains(origin)
            }))
            .allow_methods(methods)
            .allow_headers(ALLOWED_HEADERS)
            .expose_headers(EXPOSED_HEADERS)
            .max_age(config.max_age),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    fn doc() -> serde_json::Value {
        serde_json::json!({"paths": {
            "/jobs": {"get": {}, "post": {}},
            "/jobs/{id}/cancel": {"post": {}},
            "/entities/{entity_type}/{entity_id}": {"get": {}},
            "/entities/counter/{entity_id}/increment": {"post": {}},
        }})
    }

    async fn preflight(path: &str, method: &str) -> Option<String> {
        let config = CorsConfig {
            allowed_origins: vec!["https://app.example".to_owned()],
            max_age: Duration::from_secs(60),
        };
        let cors = Cors::new(&config, &doc()).expect("an origin is listed");
        let app = Router::new()
            .route("/jobs", get(|| async {}).post(|| async {}))
            .layer(cors.layer)
            .layer(axum::middleware::from_fn_with_state(cors.paths, per_path));
        let request = Request::builder()
            .method(Method::OPTIONS)
            .uri(path)
            .header(header::ORIGIN, "https://app.example")
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, method)
            .body(Body::empty())
            .expect("a request");
        let response = app.oneshot(request).await.expect("an answer");
        response
            .headers()
            .get(header::ACCESS_CONTROL_ALLOW_METHODS)
            .map(|v| v.to_str().expect("text").to_owned())
    }

    #[tokio::test]
    async fn a_preflight_is_granted_its_paths_methods_only() {
        assert_eq!(
            preflight("/jobs", "POST").await.as_deref(),
            Some("GET,POST")
        );
        assert_eq!(
            preflight("/jobs/0190c0de-0000-7000-8000-000000000000/cancel", "POST")
                .await
                .as_deref(),
            Some("POST")
        );
        assert_eq!(
            preflight("/entities/counter/c1/increment", "POST")
                .await
                .as_deref(),
            Some("POST")
        );
        assert_eq!(
            preflight("/entities/counter/c1", "GET").await.as_deref(),
            Some("GET")
        );
        assert_eq!(preflight("/nowhere", "GET").await, None);
        assert_eq!(preflight("/jobs/", "GET").await, None);
    }
}
