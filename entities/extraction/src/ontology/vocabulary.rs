//! What an ontology is reduced to for extraction: its classes and object properties, each
//! with its labels, and the file's prefixes ([`Ontology`]); the lookups the stages make by
//! name, IRI or label and through `rdfs:subClassOf`; and why one could not be loaded
//! ([`OntologyError`]). Parsed from Turtle in `turtle.rs` ([`Ontology::parse`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Why an ontology could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum OntologyError {
    /// The directory or a file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The Turtle does not parse.
    #[error("ontology `{id}`: {message}")]
    Syntax {
        /// The ontology.
        id: String,
        /// The parser's message (with the position).
        message: String,
    },
    /// It declares no class.
    #[error("ontology `{id}` declares no class (owl:Class or rdfs:Class)")]
    NoClasses {
        /// The ontology.
        id: String,
    },
    /// The file name is not a usable id.
    #[error("`{0}` is not an ontology id (letters, digits, `-`, `_`, at most 64)")]
    BadId(String),
}

/// A class of an ontology.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OntologyClass {
    /// Its IRI.
    pub iri: String,
    /// Its compact name (`foaf:Person`), or the IRI without a known prefix.
    pub name: String,
    /// `rdfs:label` and `skos:altLabel`s.
    pub labels: Vec<String>,
    /// Direct `rdfs:subClassOf` parents (IRIs).
    pub parents: Vec<String>,
}

/// An object property of an ontology.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OntologyProperty {
    /// Its IRI.
    pub iri: String,
    /// Its compact name (`foaf:knows`).
    pub name: String,
    /// `rdfs:label` and `skos:altLabel`s (the phrases that state it).
    pub labels: Vec<String>,
    /// `rdfs:domain` (IRI), if declared.
    pub domain: Option<String>,
    /// `rdfs:range` (IRI), if declared.
    pub range: Option<String>,
}

/// A loaded ontology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ontology {
    /// Its id (the file's stem).
    pub id: String,
    /// The first 16 hex digits of the SHA-256 of the file's bytes.
    pub version: String,
    /// Prefix → namespace, as the file declares them.
    pub prefixes: BTreeMap<String, String>,
    /// Its classes, by IRI order.
    pub classes: Vec<OntologyClass>,
    /// Its object properties, by IRI order.
    pub properties: Vec<OntologyProperty>,
    /// The Turtle it was parsed from (what is stored so other nodes can load this version
    /// after the file changed).
    pub source: Arc<[u8]>,
}

impl Ontology {
    /// `iri` as `prefix:local` with the longest declared namespace it starts with.
    pub fn compact(&self, iri: &str) -> String {
        self.prefixes
            .iter()
            .filter(|(_, namespace)| {
                iri.starts_with(namespace.as_str()) && iri.len() > namespace.len()
            })
            .max_by_key(|(_, namespace)| namespace.len())
            .map_or_else(
                || iri.to_owned(),
                |(prefix, namespace)| format!("{prefix}:{}", &iri[namespace.len()..]),
            )
    }

    /// The class named `name` (compact name, IRI, or label, case-insensitively).
    pub fn class(&self, name: &str) -> Option<&OntologyClass> {
        self.classes.iter().find(|c| {
            c.name == name || c.iri == name || c.labels.iter().any(|l| l.eq_ignore_ascii_case(name))
        })
    }

    /// The property named `name` (compact name, IRI, or label).
    pub fn property(&self, name: &str) -> Option<&OntologyProperty> {
        self.properties.iter().find(|p| {
            p.name == name || p.iri == name || p.labels.iter().any(|l| l.eq_ignore_ascii_case(name))
        })
    }

    /// Whether class `iri` is `ancestor` or one of its subclasses (through `rdfs:subClassOf`).
    pub fn is_a(&self, iri: &str, ancestor: &str) -> bool {
        let mut seen = BTreeSet::new();
        let mut todo = vec![iri.to_owned()];
        while let Some(current) = todo.pop() {
            if current == ancestor {
                return true;
            }
            if !seen.insert(current.clone()) {
                continue;
            }
            if let Some(class) = self.classes.iter().find(|c| c.iri == current) {
                todo.extend(class.parents.iter().cloned());
            }
        }
        false
    }
}
