//! The gateway's OpenAPI 3 document, generated from the handlers' annotations.

use utoipa::OpenApi;

use super::routes;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Shoal gateway",
        description = "Send messages to entities of a Shoal cluster."
    ),
    paths(
        routes::send_message,
        routes::explain,
        routes::cluster,
        routes::cron,
        routes::health,
        routes::ready,
        routes::metrics,
        routes::openapi_json,
    ),
    components(schemas(
        routes::SendResponse,
        routes::ErrorBody,
        routes::ErrorDetail,
        crate::retry::RetryClass,
        routes::Explain,
        routes::ClusterMap,
        routes::ShardLine,
        crate::cron::CronListing,
        crate::cron::ScheduleView,
    ))
)]
struct ApiDoc;

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// Every (method, path) the gateway's router serves; the test below keeps this list, the
/// router and the document in step.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/entities/{entity_type}/{entity_id}/{message}"),
    ("get", "/entities/{entity_type}/{entity_id}"),
    ("get", "/cluster"),
    ("get", "/cron"),
    ("get", "/health"),
    ("get", "/ready"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_document_lists_every_route() {
        let doc = serde_json::to_value(document()).expect("serializes");
        let paths = doc["paths"].as_object().expect("paths");
        let documented: BTreeSet<(String, String)> = paths
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .into_iter()
                    .flat_map(|o| o.keys())
                    .map(move |method| (method.clone(), path.clone()))
            })
            .collect();
        let routed: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
            .collect();
        assert_eq!(documented, routed);
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    }

    #[test]
    fn the_error_schema_names_the_retry_class() {
        let doc = serde_json::to_value(document()).expect("serializes");
        let schemas = &doc["components"]["schemas"];
        let detail = &schemas["ErrorDetail"];
        let required: Vec<&str> = detail["required"]
            .as_array()
            .expect("required fields")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(required.contains(&"retry"), "{detail}");
        assert_eq!(
            detail["properties"]["retry"]["$ref"], "#/components/schemas/RetryClass",
            "{detail}"
        );
        let classes: BTreeSet<&str> = schemas["RetryClass"]["enum"]
            .as_array()
            .expect("an enum of names")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(
            classes,
            BTreeSet::from(["safe", "safe_with_same_key", "may_run_twice", "never"])
        );
    }
}
