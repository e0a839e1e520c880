//! Ontologies: Turtle files in `cluster-config/ontologies/` (`<id>.ttl`), parsed with
//! `oxttl` (the Oxigraph project's Turtle parser: maintained, W3C test-suite conformant,
//! no C dependencies), versioned by the SHA-256 of the file's bytes.
//!
//! An ontology is reduced to what extraction needs: its classes (`owl:Class` or
//! `rdfs:Class`, with `rdfs:subClassOf` parents) and object properties
//! (`owl:ObjectProperty` or `rdf:Property`, with `rdfs:domain`/`rdfs:range`), each with
//! its `rdfs:label` and `skos:altLabel`s, plus the file's prefixes (the JSON-LD context and
//! the compact names results use, e.g. `foaf:Person`). A file that does not parse, or
//! declares no class, is refused at start-up naming the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use oxrdf::{NamedOrBlankNode, Term};
use oxttl::TurtleParser;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

const RDF_TYPE: &str = "http://www.w3.org/1999/02/22-rdf-syntax-ns#type";
const RDF_PROPERTY: &str = "http://www.w3.org/1999/02/22-rdf-syntax-ns#Property";
const RDFS: &str = "http://www.w3.org/2000/01/rdf-schema#";
const OWL_CLASS: &str = "http://www.w3.org/2002/07/owl#Class";
const OWL_OBJECT_PROPERTY: &str = "http://www.w3.org/2002/07/owl#ObjectProperty";
const SKOS_ALT_LABEL: &str = "http://www.w3.org/2004/02/skos/core#altLabel";

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
}

#[derive(Default)]
struct Described {
    types: BTreeSet<String>,
    labels: Vec<String>,
    parents: Vec<String>,
    domain: Option<String>,
    range: Option<String>,
}

impl Ontology {
    /// Parses Turtle `bytes` as ontology `id`.
    pub fn parse(id: &str, bytes: &[u8]) -> Result<Self, OntologyError> {
        let version = hex::encode(&Sha256::digest(bytes)[..8]);
        let mut parser = TurtleParser::new().for_slice(bytes);
        let mut described: BTreeMap<String, Described> = BTreeMap::new();
        for triple in parser.by_ref() {
            let triple = triple.map_err(|e| OntologyError::Syntax {
                id: id.to_owned(),
                message: e.to_string(),
            })?;
            let NamedOrBlankNode::NamedNode(subject) = triple.subject else {
                continue;
            };
            let entry = described.entry(subject.into_string()).or_default();
            let predicate = triple.predicate.as_str();
            match (&triple.object, predicate) {
                (Term::NamedNode(object), RDF_TYPE) => {
                    entry.types.insert(object.as_str().to_owned());
                }
                (Term::NamedNode(object), p) if p == format!("{RDFS}subClassOf") => {
                    entry.parents.push(object.as_str().to_owned());
                }
                (Term::NamedNode(object), p) if p == format!("{RDFS}domain") => {
                    entry.domain = Some(object.as_str().to_owned());
                }
                (Term::NamedNode(object), p) if p == format!("{RDFS}range") => {
                    entry.range = Some(object.as_str().to_owned());
                }
                (Term::Literal(label), p) if p == format!("{RDFS}label") => {
                    entry.labels.insert(0, label.value().to_owned());
                }
                (Term::Literal(label), SKOS_ALT_LABEL) => {
                    entry.labels.push(label.value().to_owned());
                }
                _ => {}
            }
        }
        let prefixes: BTreeMap<String, String> = parser
            .prefixes()
            .map(|(prefix, namespace)| (prefix.to_owned(), namespace.to_owned()))
            .collect();
        let mut ontology = Self {
            id: id.to_owned(),
            version,
            prefixes,
            classes: Vec::new(),
            properties: Vec::new(),
        };
        for (iri, entry) in described {
            let name = ontology.compact(&iri);
            if entry.types.contains(OWL_CLASS) || entry.types.contains(&format!("{RDFS}Class")) {
                ontology.classes.push(OntologyClass {
                    iri,
                    name,
                    labels: entry.labels,
                    parents: entry.parents,
                });
            } else if entry.types.contains(OWL_OBJECT_PROPERTY)
                || entry.types.contains(RDF_PROPERTY)
            {
                ontology.properties.push(OntologyProperty {
                    iri,
                    name,
                    labels: entry.labels,
                    domain: entry.domain,
                    range: entry.range,
                });
            }
        }
        if ontology.classes.is_empty() {
            return Err(OntologyError::NoClasses { id: id.to_owned() });
        }
        Ok(ontology)
    }

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

/// Every ontology a node knows, by id.
#[derive(Debug, Clone, Default)]
pub struct Ontologies {
    by_id: BTreeMap<String, Arc<Ontology>>,
}

/// The default ontology, compiled in so `shoal dev` and tests work without the directory.
pub const DEFAULT_FOAF: &str = include_str!("../../../cluster-config/ontologies/foaf.ttl");

impl Ontologies {
    /// The compiled-in `foaf` ontology only.
    pub fn builtin() -> Result<Self, OntologyError> {
        let mut ontologies = Self::default();
        ontologies.insert(Ontology::parse("foaf", DEFAULT_FOAF.as_bytes())?);
        Ok(ontologies)
    }

    /// The compiled-in `foaf`, then every `<id>.ttl` in `dir` (a file `foaf.ttl` there
    /// replaces the compiled-in one). A missing directory is no error.
    pub fn load(dir: &Path) -> Result<Self, OntologyError> {
        let mut ontologies = Self::builtin()?;
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ontologies),
            Err(source) => {
                return Err(OntologyError::Io {
                    path: dir.display().to_string(),
                    source,
                });
            }
        };
        let mut paths: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "ttl"))
            .collect();
        paths.sort();
        for path in paths {
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_owned();
            if !valid_id(&id) {
                return Err(OntologyError::BadId(id));
            }
            let bytes = std::fs::read(&path).map_err(|source| OntologyError::Io {
                path: path.display().to_string(),
                source,
            })?;
            ontologies.insert(Ontology::parse(&id, &bytes)?);
        }
        Ok(ontologies)
    }

    fn insert(&mut self, ontology: Ontology) {
        self.by_id.insert(ontology.id.clone(), Arc::new(ontology));
    }

    /// The ontology `id`.
    pub fn get(&self, id: &str) -> Option<&Arc<Ontology>> {
        self.by_id.get(id)
    }

    /// The known ids.
    pub fn ids(&self) -> Vec<&str> {
        self.by_id.keys().map(String::as_str).collect()
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_foaf_ontology_has_agents_and_typed_properties() {
        let ontologies = Ontologies::builtin().expect("foaf parses");
        let foaf = ontologies.get("foaf").expect("foaf");
        let person = foaf.class("foaf:Person").expect("Person");
        assert_eq!(person.iri, "http://xmlns.com/foaf/0.1/Person");
        assert!(foaf.class("Organization").is_some());
        assert!(foaf.is_a(&person.iri, "http://xmlns.com/foaf/0.1/Agent"));
        let member = foaf.property("shoal:memberOf").expect("memberOf");
        assert_eq!(
            member.range.as_deref(),
            Some("http://xmlns.com/foaf/0.1/Organization")
        );
        assert!(member.labels.iter().any(|l| l == "worked at"));
        assert_eq!(foaf.version.len(), 16);
    }

    #[test]
    fn the_version_is_the_content_hash() {
        let a = Ontology::parse("x", DEFAULT_FOAF.as_bytes()).expect("parses");
        let changed = format!("{DEFAULT_FOAF}\n# a comment changes the bytes\n");
        let b = Ontology::parse("x", changed.as_bytes()).expect("parses");
        assert_ne!(a.version, b.version);
        assert_eq!(
            a.version,
            Ontology::parse("y", DEFAULT_FOAF.as_bytes())
                .expect("p")
                .version
        );
    }

    #[test]
    fn bad_turtle_and_empty_ontologies_are_refused() {
        let bad = Ontology::parse("bad", b"@prefix x: <http://x/> .\nx:a x:b");
        assert!(matches!(bad, Err(OntologyError::Syntax { .. })), "{bad:?}");
        let empty = Ontology::parse("empty", b"<http://x/a> <http://x/b> \"c\" .");
        assert!(
            matches!(empty, Err(OntologyError::NoClasses { .. })),
            "{empty:?}"
        );
    }
}
