//! Reading ontologies: a Turtle file's bytes to an [`Ontology`] ([`Ontology::parse`],
//! with `oxttl`; the version is the bytes' SHA-256), the `<id>.ttl` files of a directory
//! ([`read_dir`]), and the compiled-in `foaf` ([`DEFAULT_FOAF`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use oxrdf::{NamedOrBlankNode, Term};
use oxttl::TurtleParser;
use sha2::{Digest, Sha256};

use super::vocabulary::{Ontology, OntologyClass, OntologyError, OntologyProperty};

const RDF_TYPE: &str = "http://www.w3.org/1999/02/22-rdf-syntax-ns#type";
const RDF_PROPERTY: &str = "http://www.w3.org/1999/02/22-rdf-syntax-ns#Property";
const RDFS: &str = "http://www.w3.org/2000/01/rdf-schema#";
const OWL_CLASS: &str = "http://www.w3.org/2002/07/owl#Class";
const OWL_OBJECT_PROPERTY: &str = "http://www.w3.org/2002/07/owl#ObjectProperty";
const SKOS_ALT_LABEL: &str = "http://www.w3.org/2004/02/skos/core#altLabel";

/// The default ontology, compiled in so `shoal dev` and tests work without the directory.
pub const DEFAULT_FOAF: &str = include_str!("../../../../cluster-config/ontologies/foaf.ttl");

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
            source: Arc::from(bytes),
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
}

/// Every `<id>.ttl` in `dir` by id, parsed (in name order); a missing directory holds none.
pub(super) type Files = Vec<(String, Result<Ontology, OntologyError>)>;

pub(super) fn read_dir(dir: &Path) -> Result<Files, OntologyError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
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
    Ok(paths
        .iter()
        .map(|path| {
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_owned();
            let file = read_file(&id, path);
            (id, file)
        })
        .collect())
}

fn read_file(id: &str, path: &Path) -> Result<Ontology, OntologyError> {
    if !valid_id(id) {
        return Err(OntologyError::BadId(id.to_owned()));
    }
    let bytes = std::fs::read(path).map_err(|source| OntologyError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ontology::parse(id, &bytes)
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
