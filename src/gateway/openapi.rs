//! The gateway's OpenAPI 3.1 document: the gateway's own operations (from the handlers'
//! annotations), one typed operation per registered entity type and message (from the
//! types' `ToSchema`s, see `openapi/entities.rs`), and the application's routes (from their
//! routers). On top of what the annotations say, it declares what the server enforces:
//! the id patterns of `crate::ids`, and the shard map's keys as the decimal strings JSON
//! object keys are.

mod entities;

pub use entities::example;

use serde_json::{Value, json};
use utoipa::OpenApi;

use super::IdempotencyKey;
use super::health::{Health, Readiness, ReadinessCheck};
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
        Health,
        Readiness,
        ReadinessCheck,
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
    unwrap_declared(&mut doc);
    declare_enforced(&mut doc);
    declare_query_tokens(&mut doc);
    declare_event_streams(&mut doc);
    declare_gateway_answers(&mut doc);
    let generic = doc["paths"][entities::GENERIC]["post"].clone();
    let typed = entities::typed_paths(registry, &generic)?;
    let into = |target: &mut Value, entries: serde_json::Map<String, Value>| {
        if let Some(target) = target.as_object_mut() {
            target.extend(entries);
        }
    };
    into(&mut doc["paths"], typed.paths);
    into(&mut doc["components"]["schemas"], typed.components);
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

/// For an application's routes: sets the schema of every `location` parameter named `name`
/// in `api` to `schema`, so the document declares the rule its handlers enforce (write
/// `schema` from the validator's own constants).
pub fn declare_parameter(
    api: &mut utoipa::openapi::OpenApi,
    location: utoipa::openapi::path::ParameterIn,
    name: &str,
    schema: Value,
) {
    let schema = object_schema(schema);
    for item in api.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            for parameter in operation.parameters.iter_mut().flatten() {
                if parameter.name == name && parameter.parameter_in == location {
                    parameter.schema = Some(schema.clone());
                }
            }
        }
    }
}

/// For an application's routes: sets the schema of `property` of the component schema
/// `component` in `api` (a rule that depends on configuration, such as the names a
/// registry knows), keeping the property's description. Nothing happens if `api` has no
/// such component.
pub fn declare_property(
    api: &mut utoipa::openapi::OpenApi,
    component: &str,
    property: &str,
    mut schema: Value,
) {
    use utoipa::openapi::RefOr;
    use utoipa::openapi::schema::Schema;

    let target = api
        .components
        .as_mut()
        .and_then(|components| components.schemas.get_mut(component));
    let Some(RefOr::T(Schema::Object(object))) = target else {
        tracing::warn!(
            component,
            property,
            "no such object schema to declare a rule on"
        );
        return;
    };
    let Some(slot) = object.properties.get_mut(property) else {
        tracing::warn!(component, property, "no such property to declare a rule on");
        return;
    };
    let description = serde_json::to_value(&*slot)
        .ok()
        .and_then(|old| old.get("description").cloned());
    if let (Some(description), Some(new)) = (description, schema.as_object_mut()) {
        new.entry("description").or_insert(description);
    }
    *slot = object_schema(schema);
}

/// The name of [`storable_json`]'s component.
pub const STORABLE_JSON: &str = "StorableJson";

/// Adds to `api` the component of any JSON value storage can hold (no string, and no
/// object key, holding a NUL character: Postgres' `jsonb` refuses it), and answers the
/// `$ref` to it, for the schema of a persisted value that is otherwise any JSON.
pub fn storable_json(api: &mut utoipa::openapi::OpenApi) -> Value {
    let reference = format!("#/components/schemas/{STORABLE_JSON}");
    let no_nul = json!({"type": "string", "pattern": "^[^\\u0000]*$"});
    let schema = json!({
        "description": "Any JSON value whose strings and keys hold no NUL character",
        "anyOf": [
            {"type": ["null", "boolean", "number"]},
            no_nul,
            {"type": "array", "items": {"$ref": reference}},
            {"type": "object", "propertyNames": no_nul,
             "additionalProperties": {"$ref": reference}},
        ],
    });
    api.components
        .get_or_insert_with(Default::default)
        .schemas
        .insert(STORABLE_JSON.to_owned(), object_schema(schema));
    json!({"$ref": reference})
}

/// `schema` (JSON Schema as OpenAPI 3.1 takes it) as utoipa's type, for
/// [`declare_parameter`] and `#[schema(schema_with = …)]` functions. A value that is not a
/// schema object is the schema that allows anything.
pub fn object_schema(schema: Value) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    // utoipa's schema types keep only the keywords they model (no `not`, `allOf` on an
    // object, `const` …): the JSON rides in an extension and `document` puts it back whole.
    let mut object = utoipa::openapi::schema::Object::new();
    let mut extensions = utoipa::openapi::extensions::Extensions::default();
    extensions.insert(DECLARED.to_owned(), schema);
    object.extensions = Some(extensions);
    utoipa::openapi::RefOr::T(utoipa::openapi::schema::Schema::Object(object))
}

/// The extension [`object_schema`] carries its JSON in.
const DECLARED: &str = "x-shoal-declared";

/// Replaces every schema [`object_schema`] made with the JSON it carries.
fn unwrap_declared(value: &mut Value) {
    match value {
        Value::Object(object) => {
            if let Some(declared) = object.remove(DECLARED) {
                *value = declared;
                unwrap_declared(value);
            } else {
                object.values_mut().for_each(unwrap_declared);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(unwrap_declared),
        _ => {}
    }
}

/// `EntityType`: ASCII letters, digits, `-`, `_`; 1 to 63.
const ENTITY_TYPE_PATTERN: &str = "^[A-Za-z0-9_-]{1,63}$";
/// `EntityId`: no control character (Unicode category Cc).
const ENTITY_ID_PATTERN: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$";

/// Declares `?access_token=` on the event-stream routes, the only ones that take it (see
/// `gateway::auth`).
fn declare_query_tokens(doc: &mut Value) {
    let streams = super::auth::streams_in(doc);
    for path in streams {
        let Some(parameters) = doc["paths"][&path]["get"]
            .as_object_mut()
            .map(|operation| operation.entry("parameters").or_insert_with(|| json!([])))
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        parameters.push(json!({
            "name": "access_token", "in": "query", "required": false,
            "description": "With auth on, for a browser's `EventSource` (which cannot set \
                `Authorization`): the bearer token, expiring within \
                `[gateway.auth] query-token-max-lifetime` (default 5 minutes). Taken out \
                of the URI before the route sees it.",
            "schema": {"type": "string"},
        }));
    }
}

/// Declares on every operation the answers the gateway's middleware gives before (or
/// instead of) its handler: 401 and 403 from the auth gate (when `[gateway.auth]` is on;
/// not on the operational routes), 429 and 503 from the rate limits (with `Retry-After`),
/// 413 from the body limit on an operation with a body. `Retry-After` is declared on every
/// 429 and 503.
fn declare_gateway_answers(doc: &mut Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    let error = json!({"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}});
    let retry_after = json!({"Retry-After": {
        "description": "Seconds to wait before sending again",
        "schema": {"type": "integer", "minimum": 0},
    }});
    for (path, item) in paths.iter_mut() {
        let open = super::auth::is_open(path);
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for operation in item.values_mut() {
            let has_body = operation.get("requestBody").is_some();
            let Some(responses) = operation
                .get_mut("responses")
                .and_then(Value::as_object_mut)
            else {
                continue;
            };
            let mut answers = vec![];
            if !open {
                answers.push(("401", "Auth is on and the token is missing or invalid"));
                answers.push(("403", "The token may not use this tenant or entity"));
                answers.push(("429", "The caller's rate limit; see `Retry-After`"));
                answers.push((
                    "503",
                    "Unavailable (rate limits without Redis, owner or storage); see `Retry-After`",
                ));
            }
            if has_body {
                answers.push(("413", "Body over `gateway.max-body-bytes`"));
            }
            for (status, description) in answers {
                responses
                    .entry(status)
                    .or_insert_with(|| json!({"description": description, "content": error}));
            }
            for status in ["429", "503"].into_iter().filter(|_| !open) {
                if let Some(headers) = responses
                    .get_mut(status)
                    .and_then(Value::as_object_mut)
                    .map(|response| response.entry("headers").or_insert_with(|| json!({})))
                    .and_then(Value::as_object_mut)
                {
                    headers.extend(retry_after.as_object().cloned().unwrap_or_default());
                }
            }
        }
    }
}

/// One Server-Sent Event as a client reads it off a `text/event-stream` answer (the
/// fields of the HTML standard's event stream; a comment line is no event).
fn event_schema() -> Value {
    json!({
        "type": "object",
        "description": "One event of the stream",
        "properties": {
            "id": {"type": "string", "description": "The event's id (`Last-Event-ID` resumes after it)"},
            "event": {"type": "string", "description": "The event's type"},
            "data": {"type": "string", "description": "The event's data: JSON text"},
            "retry": {"type": "integer", "minimum": 0, "description": "Reconnection time, milliseconds"},
        },
    })
}

/// Gives every `text/event-stream` answer the schema of one event (OpenAPI 3.2's
/// `itemSchema`, as `schema` for 3.1 readers).
fn declare_event_streams(doc: &mut Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    let operations = paths
        .values_mut()
        .filter_map(Value::as_object_mut)
        .flat_map(|item| item.values_mut());
    for operation in operations {
        let Some(responses) = operation
            .get_mut("responses")
            .and_then(Value::as_object_mut)
        else {
            continue;
        };
        for response in responses.values_mut() {
            if let Some(stream) = response
                .pointer_mut("/content/text~1event-stream")
                .and_then(Value::as_object_mut)
            {
                stream.insert("schema".into(), event_schema());
            }
        }
    }
}

/// Declares in `doc` the rules the server enforces that the annotations cannot say.
fn declare_enforced(doc: &mut Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for operation in paths.values_mut().filter_map(Value::as_object_mut) {
        for operation in operation.values_mut() {
            let Some(parameters) = operation
                .get_mut("parameters")
                .and_then(Value::as_array_mut)
            else {
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
                    (Some("X-Request-Timeout"), Some("header")) => json!({
                        "type": "string", "pattern": routes::REQUEST_TIMEOUT_PATTERN,
                    }),
                    (Some("Idempotency-Key"), Some("header")) => json!({
                        "type": "string", "minLength": 1,
                        "maxLength": IdempotencyKey::MAX_CHARS,
                        "pattern": IdempotencyKey::HEADER_PATTERN,
                    }),
                    _ => continue,
                };
                parameter["schema"] = schema;
            }
        }
    }
    // A JSON object's keys are strings: the shard numbers arrive as decimal text.
    if let Some(shards) = doc
        .pointer_mut("/components/schemas/ClusterMap/properties/shards")
        .and_then(Value::as_object_mut)
    {
        shards.insert(
            "propertyNames".into(),
            json!({"type": "string", "pattern": "^(0|[1-9][0-9]*)$"}),
        );
    }
}

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
        let routed: BTreeSet<(String, String)> = super::super::own_routes()
            .into_iter()
            .map(|(m, p, _)| (m.to_owned(), p.to_owned()))
            .collect();
        assert_eq!(documented, routed);
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    }

    #[derive(serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
    #[serde(rename_all = "snake_case", deny_unknown_fields)]
    enum Closed {
        /// Sets the value.
        Set {
            value: i64,
        },
        Clear,
    }

    #[derive(serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
    #[serde(rename_all = "snake_case")]
    enum Open {
        Note { text: String },
    }

    struct Typed<const CLOSED: bool, M>(std::marker::PhantomData<M>);

    impl<const CLOSED: bool, M> crate::entity::EntityProtocol for Typed<CLOSED, M>
    where
        M: serde::Serialize + serde::de::DeserializeOwned + utoipa::ToSchema + Send + Sync,
        M: 'static,
    {
        const NAME: &'static str = if CLOSED { "closed" } else { "open" };
        const ACCESS: crate::entity::GatewayAccess =
            crate::entity::GatewayAccess::Public(crate::entity::TenantScope::IdPrefix);
        const INTERNAL_MESSAGES: &'static [&'static str] = if CLOSED { &["clear"] } else { &[] };
        type Message = M;
        type Reply = i64;
        fn is_persisted(_: &M) -> bool {
            false
        }
    }

    impl<const CLOSED: bool, M> crate::entity::Entity for Typed<CLOSED, M>
    where
        M: serde::Serialize + serde::de::DeserializeOwned + utoipa::ToSchema + Send + Sync,
        M: 'static,
    {
        type State = i64;
        async fn handle(
            &self,
            _: &crate::entity::EntityContext,
            _: &mut i64,
            _: M,
        ) -> Result<i64, crate::entity::HandlerError> {
            Ok(0)
        }
    }

    #[test]
    fn each_registered_message_has_a_typed_operation() {
        let mut registry = EntityRegistry::new();
        registry
            .register(Typed::<true, Closed>(Default::default()))
            .expect("registers")
            .register(Typed::<false, Open>(Default::default()))
            .expect("registers");
        let doc = document(&registry, Vec::new()).expect("the document builds");
        let body = |path: &str| {
            doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
                .clone()
        };
        let set = body("/entities/closed/{entity_id}/set");
        assert_eq!(set["properties"]["value"]["type"], "integer", "{set}");
        assert_eq!(
            set["additionalProperties"], false,
            "deny_unknown_fields: {set}"
        );
        assert!(
            doc["paths"]
                .get("/entities/closed/{entity_id}/clear")
                .is_none(),
            "an internal message is not listed"
        );
        let note = body("/entities/open/{entity_id}/note");
        assert!(note.get("additionalProperties").is_none(), "{note}");
        let reply = &doc["paths"]["/entities/open/{entity_id}/note"]["post"]["responses"]["200"];
        assert_eq!(
            reply["content"]["application/json"]["schema"]["properties"]["reply"]["type"],
            "integer"
        );
        let params = &doc["paths"]["/entities/open/{entity_id}/note"]["post"]["parameters"];
        let names: Vec<&str> = params
            .as_array()
            .expect("parameters")
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert!(
            names.contains(&"entity_id") && !names.contains(&"entity_type"),
            "{names:?}"
        );
        assert!(
            doc["paths"][entities::GENERIC]["post"].is_object(),
            "generic route kept"
        );
    }

    /// A type that keeps the default access: internal.
    struct Hidden;

    impl crate::entity::EntityProtocol for Hidden {
        const NAME: &'static str = "hidden";
        type Message = Open;
        type Reply = i64;
        fn is_persisted(_: &Open) -> bool {
            false
        }
    }

    impl crate::entity::Entity for Hidden {
        type State = i64;
        async fn handle(
            &self,
            _: &crate::entity::EntityContext,
            _: &mut i64,
            _: Open,
        ) -> Result<i64, crate::entity::HandlerError> {
            Ok(0)
        }
    }

    #[test]
    fn internal_types_are_not_listed() {
        let mut registry = EntityRegistry::new();
        registry.register(Hidden).expect("registers");
        let doc = document(&registry, Vec::new()).expect("the document builds");
        let listed: Vec<&String> = doc["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .filter(|path| path.contains("hidden"))
            .collect();
        assert!(listed.is_empty(), "{listed:?}");
    }

    #[test]
    fn every_operation_declares_the_middlewares_answers() {
        let doc = bare();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, operation) in item.as_object().expect("operations") {
                let responses = &operation["responses"];
                let what = format!("{method} {path}");
                if operation.get("requestBody").is_some() {
                    assert!(responses.get("413").is_some(), "{what}");
                }
                if super::super::auth::is_open(path) {
                    assert!(responses.get("401").is_none(), "{what}");
                    continue;
                }
                for status in ["401", "403", "429", "503"] {
                    assert!(responses.get(status).is_some(), "{what}: {status}");
                }
                for status in ["429", "503"] {
                    assert!(
                        responses[status]["headers"].get("Retry-After").is_some(),
                        "{what}: {status}"
                    );
                }
            }
        }
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

#[cfg(test)]
mod declare_tests {
    use serde_json::json;
    use utoipa::openapi::path::ParameterIn;

    use super::*;

    #[derive(serde::Deserialize, utoipa::ToSchema)]
    #[allow(dead_code)]
    struct Body {
        /// The kind.
        kind: String,
        count: Option<u32>,
    }

    /// A route of an application, to declare rules on.
    #[utoipa::path(post, path = "/things/{id}", request_body = Body,
        params(("id" = String, Path, description = "The thing")),
        responses((status = 200, description = "Done")))]
    #[allow(dead_code)]
    async fn thing() {}

    #[test]
    fn declared_rules_land_on_the_parameter_and_the_property() {
        let (_, mut api) = utoipa_axum::router::OpenApiRouter::<()>::new()
            .routes(utoipa_axum::routes!(thing))
            .split_for_parts();
        declare_parameter(
            &mut api,
            ParameterIn::Path,
            "id",
            json!({"type": "string", "pattern": "^t-[0-9]+$"}),
        );
        declare_property(
            &mut api,
            "Body",
            "kind",
            json!({"type": "string", "enum": ["a", "b"]}),
        );
        declare_property(
            &mut api,
            "Body",
            "count",
            json!({"type": ["integer", "null"], "minimum": 1, "maximum": u64::MAX}),
        );
        let mut doc = serde_json::to_value(&api).expect("serializes");
        unwrap_declared(&mut doc);
        let id = &doc["paths"]["/things/{id}"]["post"]["parameters"][0]["schema"];
        assert_eq!(id["pattern"], "^t-[0-9]+$", "{doc}");
        let body = &doc["components"]["schemas"]["Body"];
        assert_eq!(
            body["properties"]["kind"]["enum"],
            json!(["a", "b"]),
            "{body}"
        );
        assert_eq!(
            body["properties"]["kind"]["description"], "The kind.",
            "{body}"
        );
        assert_eq!(
            body["properties"]["count"]["maximum"],
            json!(u64::MAX),
            "{body}"
        );
        assert_eq!(body["required"], json!(["kind"]), "{body}");
    }
}
