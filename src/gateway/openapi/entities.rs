//! One operation per registered type and message, from the schemas of the type's Rust
//! types: `POST /entities/counter/{entity_id}/increment` with the body schema of that
//! variant of the message enum and the reply schema in the 200 answer. The rest of each
//! operation (headers, query, error answers) is copied from the generic route, so the two
//! cannot drift apart.

use serde_json::{Map, Value, json};

use crate::entity::{DecodeError, EntityRegistry, ErasedEntity, GatewayAccess};

/// The generic route the typed operations are instances of.
pub(crate) const GENERIC: &str = "/entities/{entity_type}/{entity_id}/{message}";

/// One message of a type: its name, what its body looks like, and its description.
#[derive(Debug, PartialEq)]
pub(crate) struct MessageBody {
    pub(crate) name: String,
    pub(crate) schema: Value,
    pub(crate) description: Option<String>,
}

/// The messages of an externally tagged enum's schema: an object variant
/// `{"<name>": body}` gives `body`; a unit variant (a string enum) takes an empty object.
/// Variants of other shapes (untagged, internally tagged) are left out: the generic route
/// still serves them.
pub(crate) fn messages(schema: &Value) -> Vec<MessageBody> {
    let variants = match schema.get("oneOf").and_then(Value::as_array) {
        Some(variants) => variants.clone(),
        None => vec![schema.clone()],
    };
    let mut out = Vec::new();
    for variant in variants {
        let description = variant
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if let Some(names) = variant.get("enum").and_then(Value::as_array) {
            for name in names.iter().filter_map(Value::as_str) {
                out.push(MessageBody {
                    name: name.to_owned(),
                    schema: json!({"type": "object", "additionalProperties": false}),
                    description: description.clone(),
                });
            }
        } else if let Some(properties) = variant.get("properties").and_then(Value::as_object)
            && properties.len() == 1
            && let Some((name, body)) = properties.iter().next()
        {
            let description = description.or_else(|| {
                body.get("description")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            });
            out.push(MessageBody {
                name: name.clone(),
                schema: body.clone(),
                description,
            });
        }
    }
    out
}

/// A field no message has.
const UNKNOWN_FIELD: &str = "__shoal_unknown_field__";

/// Whether the type's decoder refuses fields its message `name` does not have (serde's
/// `deny_unknown_fields`, which the schema derive does not carry over to enum variants):
/// asked of the decoder itself, so the document says what the server does.
fn refuses_unknown_fields(def: &dyn ErasedEntity, name: &str) -> bool {
    match def.decode(name, json!({ UNKNOWN_FIELD: null })) {
        Err(DecodeError::InvalidBody { problem, .. }) => problem.contains("unknown field"),
        _ => false,
    }
}

/// What the registered types add to the document.
#[derive(Debug, Default)]
pub(crate) struct TypedPaths {
    /// Path → path item, one per type and message.
    pub(crate) paths: Map<String, Value>,
    /// The named schemas they refer to.
    pub(crate) components: Map<String, Value>,
}

/// The typed operations of every registered type (sorted by path), and the named
/// schemas they refer to. `generic` is the generic route's `post` operation.
pub(crate) fn typed_paths(
    registry: &EntityRegistry,
    generic: &Value,
) -> Result<TypedPaths, String> {
    let mut paths = Map::new();
    let mut components = Map::new();
    let mut names: Vec<_> = registry.names().cloned().collect();
    names.sort();
    for entity_type in names {
        let Some(def) = registry.get(&entity_type) else {
            continue;
        };
        // What the generic routes do not reach, the document does not list.
        if def.access() == GatewayAccess::Internal {
            continue;
        }
        let schemas = def.schemas();
        let to_json = |s| serde_json::to_value(s).map_err(|e| e.to_string());
        let reply = to_json(&schemas.reply)?;
        for (name, schema) in &schemas.components {
            components.insert(name.clone(), to_json(schema)?);
        }
        let public = messages(&to_json(&schemas.message)?)
            .into_iter()
            .filter(|message| !def.is_internal_message(&message.name));
        for mut message in public {
            if refuses_unknown_fields(def.as_ref(), &message.name)
                && message.schema.get("type").is_some_and(|t| t == "object")
            {
                message.schema["additionalProperties"] = json!(false);
            }
            let path = format!("/entities/{entity_type}/{{entity_id}}/{}", message.name);
            let mut operation = typed_operation(generic, entity_type.as_str(), &message, &reply);
            let example = example(&message.schema, &components);
            if let Some(persisted) = example
                .and_then(|body| def.decode(&message.name, body).ok())
                .map(|decoded| def.is_persisted(&decoded))
            {
                declare_kind(&mut operation, persisted);
            }
            paths.insert(path, json!({ "post": operation }));
        }
    }
    Ok(TypedPaths { paths, components })
}

/// A value `schema` allows (its `$ref`s into `components`, the document's
/// `components.schemas`): required properties only, the first of every choice, the least
/// of every bound. `None` where the schema is beyond that. The document asks the type's
/// decoder what kind of message such a body is; tests build requests with it.
pub fn example(schema: &Value, components: &Map<String, Value>) -> Option<Value> {
    example_within(schema, components, 0)
}

fn example_within(schema: &Value, components: &Map<String, Value>, depth: usize) -> Option<Value> {
    if depth > 16 {
        return None;
    }
    if let Some(name) = schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/components/schemas/"))
    {
        return example_within(components.get(name)?, components, depth + 1);
    }
    if let Some(first) = schema.get("enum").and_then(|e| e.get(0)) {
        return Some(first.clone());
    }
    for choice in ["oneOf", "anyOf", "allOf"] {
        if let Some(first) = schema.get(choice).and_then(|c| c.get(0)) {
            return example_within(first, components, depth + 1);
        }
    }
    let kind = match &schema["type"] {
        Value::String(kind) => kind.as_str(),
        Value::Array(kinds) => kinds
            .iter()
            .filter_map(Value::as_str)
            .find(|k| *k != "null")
            .unwrap_or("null"),
        _ => "null",
    };
    Some(match kind {
        "object" => {
            let mut object = Map::new();
            for name in schema["required"].as_array().into_iter().flatten() {
                let name = name.as_str()?;
                let property = example_within(&schema["properties"][name], components, depth + 1)?;
                object.insert(name.to_owned(), property);
            }
            Value::Object(object)
        }
        "integer" | "number" => schema.get("minimum").cloned().unwrap_or(json!(0)),
        "string" => {
            let length = schema["minLength"].as_u64().unwrap_or(1).min(64);
            json!("x".repeat(length as usize))
        }
        "boolean" => json!(false),
        "array" => json!([]),
        _ => Value::Null,
    })
}

/// Narrows `?persisted=` to the message's kind and, for a volatile message, drops
/// `Idempotency-Key` (the server refuses both otherwise, with 400 `not_persisted`).
fn declare_kind(operation: &mut Value, persisted: bool) {
    let Some(parameters) = operation
        .get_mut("parameters")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    if !persisted {
        parameters.retain(|p| !(p["in"] == "header" && p["name"] == "Idempotency-Key"));
    }
    for parameter in parameters {
        if parameter["in"] == "query" && parameter["name"] == "persisted" {
            parameter["schema"] = json!({"type": "boolean", "enum": [persisted]});
            parameter["description"] = json!(if persisted {
                "This message is always persisted: `true` when given"
            } else {
                "This message is volatile: `false` when given"
            });
        }
    }
}

/// The generic operation narrowed to one type and message.
fn typed_operation(
    generic: &Value,
    entity_type: &str,
    message: &MessageBody,
    reply: &Value,
) -> Value {
    let mut operation = generic.clone();
    let Some(object) = operation.as_object_mut() else {
        return operation;
    };
    object.insert(
        "operationId".into(),
        json!(format!("{entity_type}_{}", message.name)),
    );
    object.insert("tags".into(), json!([entity_type]));
    object.insert(
        "summary".into(),
        json!(format!("`{}` to a `{entity_type}`", message.name)),
    );
    match &message.description {
        Some(description) => object.insert("description".into(), json!(description)),
        None => object.remove("description"),
    };
    if let Some(parameters) = object.get_mut("parameters").and_then(Value::as_array_mut) {
        parameters.retain(|p| {
            !(p["in"] == "path" && (p["name"] == "entity_type" || p["name"] == "message"))
        });
    }
    object.insert(
        "requestBody".into(),
        json!({
            "description": format!("The body of `{}`", message.name),
            "content": {"application/json": {"schema": message.schema}},
        }),
    );
    let answer = &mut object["responses"]["200"];
    answer["content"]["application/json"]["schema"] = json!({
        "type": "object",
        "required": ["reply", "entity", "persisted"],
        "properties": {
            "reply": reply,
            "entity": {"type": "string", "description": "`type/id` of the entity"},
            "persisted": {"type": "boolean", "description": "Whether the message was persisted before delivery"},
        },
        "additionalProperties": false,
    });
    operation
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tagged_variants_become_messages() {
        let schema = json!({"oneOf": [
            {"type": "object", "required": ["add"], "description": "Adds.",
             "properties": {"add": {"type": "object", "properties": {"n": {"type": "integer"}}}}},
            {"type": "string", "enum": ["get", "reset"]},
            {"type": "object", "properties": {"a": {}, "b": {}}},
        ]});
        let found = messages(&schema);
        let names: Vec<&str> = found.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["add", "get", "reset"]);
        assert_eq!(found[0].schema["properties"]["n"]["type"], "integer");
        assert_eq!(found[0].description.as_deref(), Some("Adds."));
        assert_eq!(found[1].schema["additionalProperties"], false);
    }
}
