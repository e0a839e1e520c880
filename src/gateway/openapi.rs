//! The gateway's OpenAPI 3.1 document: the gateway's own operations (from the handlers'
//! annotations), one typed operation per registered entity type and message (from the
//! types' `ToSchema`s, see [`entities`]), and the application's routes (from their
//! routers). On top of what the annotations say, it declares what the server enforces:
//! the id patterns of `crate::ids`, and the shard map's keys as the decimal strings JSON
//! object keys are.

mod entities;

use serde_json::{Value, json};
use utoipa::OpenApi;

use super::routes;
use crate::entity::EntityRegistry;

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

/// The document of a gateway that knows `registry`'s types and serves the application
/// routes described by `fragments`.
pub fn document(
    registry: &EntityRegistry,
    fragments: Vec<utoipa::openapi::OpenApi>,
) -> Result<Value, String> {
    let mut api = ApiDoc::openapi();
    for fragment in fragments {
        api.merge(fragment);
    }
    let mut doc = serde_json::to_value(api).map_err(|e| e.to_string())?;
    declare_enforced(&mut doc);
    let generic = doc["paths"][entities::GENERIC]["post"].clone();
    let (paths, schemas) = entities::typed_paths(registry, &generic)?;
    let into = |target: &mut Value, entries: serde_json::Map<String, Value>| {
        if let Some(target) = target.as_object_mut() {
            target.extend(entries);
        }
    };
    into(&mut doc["paths"], paths);
    into(&mut doc["components"]["schemas"], schemas);
    Ok(doc)
}

/// The document as `/openapi.json` serves it.
pub(crate) fn render(
    registry: &EntityRegistry,
    fragments: Vec<utoipa::openapi::OpenApi>,
) -> Result<axum::body::Bytes, String> {
    let doc = document(registry, fragments)?;
    serde_json::to_vec(&doc)
        .map(Into::into)
        .map_err(|e| e.to_string())
}

/// `EntityType`: ASCII letters, digits, `-`, `_`; 1 to 63.
const ENTITY_TYPE_PATTERN: &str = "^[A-Za-z0-9_-]{1,63}$";
/// `EntityId`: no control character (Unicode category Cc).
const ENTITY_ID_PATTERN: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$";

/// Declares in `doc` the rules the server enforces that the annotations cannot say.
fn declare_enforced(doc: &mut Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for operation in paths.values_mut().filter_map(Value::as_object_mut) {
        for operation in operation.values_mut() {
            let Some(parameters) = operation["parameters"].as_array_mut() else {
                continue;
            };
            for parameter in parameters {
                let schema = match (parameter["name"].as_str(), parameter["in"].as_str()) {
                    (Some("entity_type"), Some("path")) => json!({
                        "type": "string", "pattern": ENTITY_TYPE_PATTERN,
                        "minLength": 1, "maxLength": 63,
                    }),
                    (Some("entity_id"), Some("path")) => json!({
                        "type": "string", "pattern": ENTITY_ID_PATTERN, "minLength": 1,
                        "maxLength": 512,
                        "description": "At most 512 bytes of UTF-8, no control characters",
                    }),
                    (Some("Idempotency-Key"), Some("header")) => json!({
                        "type": "string", "minLength": 1, "maxLength": 255,
                    }),
                    _ => continue,
                };
                parameter["schema"] = schema;
            }
        }
    }
    // A JSON object's keys are strings: the shard numbers arrive as decimal text.
    let shards = &mut doc["components"]["schemas"]["ClusterMap"]["properties"]["shards"];
    if shards.is_object() {
        shards["propertyNames"] = json!({"type": "string", "pattern": "^(0|[1-9][0-9]*)$"});
    }
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

    fn bare() -> Value {
        document(&EntityRegistry::new(), Vec::new()).expect("the document builds")
    }

    #[test]
    fn the_document_lists_every_route() {
        let doc = bare();
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
        let doc = bare();
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
