//! A result as JSON-LD (`Accept: application/ld+json`): one node per entity, typed with
//! its class's IRI, named with `rdfs:label`, linked to other entities by the properties'
//! IRIs, in the default graph. Entities are `urn:shoal:<extraction id>:<entity id>`; every IRI is absolute, so
//! the document needs no remote context and any JSON-LD processor reads it offline.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::model::ExtractionResult;

const RDFS_LABEL: &str = "http://www.w3.org/2000/01/rdf-schema#label";

/// The IRI of entity `entity` of extraction `id`.
pub fn entity_iri(id: &str, entity: &str) -> String {
    format!("urn:shoal:{id}:{entity}")
}

/// The JSON-LD document of `result`.
pub fn document(result: &ExtractionResult) -> Value {
    let mut links: BTreeMap<&str, BTreeMap<&str, Vec<Value>>> = BTreeMap::new();
    for relation in &result.relations {
        links
            .entry(relation.subject.as_str())
            .or_default()
            .entry(relation.predicate_iri.as_str())
            .or_default()
            .push(json!({"@id": entity_iri(&result.id, &relation.object)}));
    }
    let graph: Vec<Value> = result
        .entities
        .iter()
        .map(|entity| {
            let mut node = Map::new();
            node.insert("@id".into(), entity_iri(&result.id, &entity.id).into());
            node.insert("@type".into(), entity.class_iri.clone().into());
            node.insert(RDFS_LABEL.into(), entity.name.clone().into());
            for (predicate, objects) in links.get(entity.id.as_str()).into_iter().flatten() {
                node.insert((*predicate).to_owned(), Value::Array(objects.clone()));
            }
            Value::Object(node)
        })
        .collect();
    // A top-level `@id` would make the graph a named graph; the nodes belong to the
    // default graph.
    json!({"@graph": graph})
}
