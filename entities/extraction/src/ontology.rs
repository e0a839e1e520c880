//! Ontologies: Turtle files in `cluster-config/ontologies/` (`<id>.ttl`), parsed with
//! `oxttl` (the Oxigraph project's Turtle parser: maintained, W3C test-suite conformant,
//! no C dependencies), versioned by the SHA-256 of the file's bytes.
//!
//! An ontology is reduced to what extraction needs: its classes (`owl:Class` or
//! `rdfs:Class`, with `rdfs:subClassOf` parents) and object properties
//! (`owl:ObjectProperty` or `rdf:Property`, with `rdfs:domain`/`rdfs:range`), each with
//! its `rdfs:label` and `skos:altLabel`s, plus the file's prefixes (the JSON-LD context and
//! the compact names results use, e.g. `foaf:Person`). A file that does not parse, or
//! declares no class, is refused at start-up naming the file; on a reload it is reported
//! and its last good version stays ([`Ontologies`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};

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
    /// The Turtle it was parsed from (what is stored so other nodes can load this version
    /// after the file changed).
    pub source: Arc<[u8]>,
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

/// Every ontology a node knows, by id: a handle shared by the node's routes and entities,
/// re-read from the directory without a restart ([`Ontologies::reload`], every
/// `[extraction] ontology-reload-interval` and whenever a request pins a version this node
/// has not read yet).
///
/// Each id has its **current** version (what new requests pin) and up to
/// [`KEPT_VERSIONS`] earlier ones, so an extraction that pinned a version before a file
/// changed still finds it. A file that no longer parses keeps its last good version (the
/// reload reports it); a file that is gone is no longer offered to new requests, and its
/// versions stay for the runs that pinned them (`foaf` is never withdrawn: without its
/// file the last version read stays current). Versions this node never read — the file
/// changed before it started — come from the other nodes through storage
/// ([`Ontologies::adopt`], module `journal`).
#[derive(Debug, Clone)]
pub struct Ontologies {
    catalog: Arc<RwLock<Arc<Catalog>>>,
    /// Held by a reload or an adoption from start to publish, so two never overwrite
    /// each other's result.
    changing: Arc<Mutex<()>>,
    dir: Option<PathBuf>,
}

/// A handle that does not keep the ontologies alive ([`Ontologies::downgrade`]).
#[derive(Debug, Clone)]
pub struct WeakOntologies {
    catalog: Weak<RwLock<Arc<Catalog>>>,
    changing: Weak<Mutex<()>>,
    dir: Option<PathBuf>,
}

impl WeakOntologies {
    /// The ontologies, while any strong handle is left.
    pub fn upgrade(&self) -> Option<Ontologies> {
        Some(Ontologies {
            catalog: self.catalog.upgrade()?,
            changing: self.changing.upgrade()?,
            dir: self.dir.clone(),
        })
    }
}

/// Earlier versions kept per id beside the current one.
pub const KEPT_VERSIONS: usize = 4;

#[derive(Debug, Clone, Default)]
struct Catalog {
    by_id: BTreeMap<String, Versions>,
}

#[derive(Debug, Clone, Default)]
struct Versions {
    /// What new requests pin; `None` once the file is gone.
    current: Option<Arc<Ontology>>,
    /// Earlier versions, newest first.
    earlier: VecDeque<Arc<Ontology>>,
}

impl Versions {
    fn offer(&mut self, ontology: Ontology) -> bool {
        if let Some(current) = &self.current
            && current.version == ontology.version
        {
            return false;
        }
        let ontology = Arc::new(ontology);
        self.earlier.retain(|o| o.version != ontology.version);
        if let Some(previous) = self.current.replace(ontology) {
            self.keep_earlier(previous);
        }
        true
    }

    fn withdraw(&mut self) {
        if let Some(previous) = self.current.take() {
            self.keep_earlier(previous);
        }
    }

    /// Keeps `ontology` as the newest earlier version (dropping the oldest past the bound).
    fn keep_earlier(&mut self, ontology: Arc<Ontology>) {
        self.earlier.push_front(ontology);
        self.earlier.truncate(KEPT_VERSIONS);
    }

    fn find(&self, version: &str) -> Option<Arc<Ontology>> {
        self.current
            .iter()
            .chain(&self.earlier)
            .find(|o| o.version == version)
            .cloned()
    }
}

/// What one [`Ontologies::reload`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Ids whose current version changed (new files included).
    pub changed: Vec<String>,
    /// Ids whose file is gone.
    pub removed: Vec<String>,
    /// Files that did not load (their last good version stays current).
    pub failed: Vec<String>,
}

/// The default ontology, compiled in so `shoal dev` and tests work without the directory.
pub const DEFAULT_FOAF: &str = include_str!("../../../cluster-config/ontologies/foaf.ttl");

impl Ontologies {
    /// The compiled-in `foaf` ontology only.
    pub fn builtin() -> Result<Self, OntologyError> {
        let mut versions = Versions::default();
        versions.offer(Ontology::parse("foaf", DEFAULT_FOAF.as_bytes())?);
        let mut catalog = Catalog::default();
        catalog.by_id.insert("foaf".to_owned(), versions);
        Ok(Self {
            catalog: Arc::new(RwLock::new(Arc::new(catalog))),
            changing: Arc::new(Mutex::new(())),
            dir: None,
        })
    }

    /// The compiled-in `foaf`, then every `<id>.ttl` in `dir` (a file `foaf.ttl` there
    /// replaces the compiled-in one). A missing directory is no error; at start-up a file
    /// that does not load is (naming the file).
    pub fn load(dir: &Path) -> Result<Self, OntologyError> {
        let mut ontologies = Self::builtin()?;
        ontologies.dir = Some(dir.to_owned());
        let mut catalog = Catalog::clone(&ontologies.snapshot());
        for (_, file) in read_dir(dir)? {
            let ontology = file?;
            catalog
                .by_id
                .entry(ontology.id.clone())
                .or_default()
                .offer(ontology);
        }
        ontologies.publish(catalog);
        Ok(ontologies)
    }

    /// Re-reads the directory this handle was loaded from (nothing for [`Self::builtin`]);
    /// every clone of the handle sees the result at once.
    pub fn reload(&self) -> Reloaded {
        let mut report = Reloaded::default();
        let Some(dir) = &self.dir else {
            return report;
        };
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let files = match read_dir(dir) {
            Ok(files) => files,
            Err(error) => {
                tracing::warn!(%error, "could not re-read the ontologies; keeping what is loaded");
                report.failed.push(dir.display().to_string());
                metrics::counter!("shoal_extraction_ontology_reloads_total", "outcome" => "failed")
                    .increment(1);
                return report;
            }
        };
        let mut catalog = Catalog::clone(&self.snapshot());
        let mut seen = BTreeSet::from(["foaf".to_owned()]);
        for (id, file) in files {
            // A file that is there but does not load keeps its last good version.
            seen.insert(id.clone());
            match file {
                Ok(ontology) => {
                    if catalog.by_id.entry(id.clone()).or_default().offer(ontology) {
                        report.changed.push(id);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "an ontology did not load; its last good version stays");
                    report.failed.push(error.to_string());
                }
            }
        }
        for (id, versions) in &mut catalog.by_id {
            if !seen.contains(id) && versions.current.is_some() {
                versions.withdraw();
                report.removed.push(id.clone());
            }
        }
        if report.changed.is_empty() && report.removed.is_empty() {
            let outcome = if report.failed.is_empty() {
                "unchanged"
            } else {
                "failed"
            };
            metrics::counter!("shoal_extraction_ontology_reloads_total", "outcome" => outcome)
                .increment(1);
            return report;
        }
        tracing::info!(changed = ?report.changed, removed = ?report.removed, "ontologies reloaded");
        metrics::counter!("shoal_extraction_ontology_reloads_total", "outcome" => "changed")
            .increment(1);
        self.publish(catalog);
        report
    }

    fn snapshot(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn publish(&self, catalog: Catalog) {
        *self.catalog.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(catalog);
    }

    /// The current version of `id`.
    pub fn get(&self, id: &str) -> Option<Arc<Ontology>> {
        self.snapshot().by_id.get(id)?.current.clone()
    }

    /// Version `version` of `id`, current or kept.
    pub fn version(&self, id: &str, version: &str) -> Option<Arc<Ontology>> {
        self.snapshot().by_id.get(id)?.find(version)
    }

    /// The ids new requests may name.
    pub fn ids(&self) -> Vec<String> {
        self.snapshot()
            .by_id
            .iter()
            .filter(|(_, v)| v.current.is_some())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A handle that does not keep these alive (for a task that should end with them).
    pub fn downgrade(&self) -> WeakOntologies {
        WeakOntologies {
            catalog: Arc::downgrade(&self.catalog),
            changing: Arc::downgrade(&self.changing),
            dir: self.dir.clone(),
        }
    }

    /// The current version of every id.
    pub fn current(&self) -> Vec<Arc<Ontology>> {
        self.snapshot()
            .by_id
            .values()
            .filter_map(|v| v.current.clone())
            .collect()
    }

    /// Keeps `ontology` as an earlier version of its id (one this node's files no longer
    /// hold, loaded from where the nodes store every version they offered); the current
    /// version stays. Returns the kept version.
    pub fn adopt(&self, ontology: Ontology) -> Arc<Ontology> {
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let mut catalog = Catalog::clone(&self.snapshot());
        let versions = catalog.by_id.entry(ontology.id.clone()).or_default();
        if let Some(known) = versions.find(&ontology.version) {
            return known;
        }
        let ontology = Arc::new(ontology);
        versions.keep_earlier(ontology.clone());
        self.publish(catalog);
        ontology
    }
}

/// Every `<id>.ttl` in `dir` by id, parsed (in name order); a missing directory holds none.
type Files = Vec<(String, Result<Ontology, OntologyError>)>;

fn read_dir(dir: &Path) -> Result<Files, OntologyError> {
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

    /// A fresh directory under the system's temp dir.
    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shoal-ontologies-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    const SMALL: &str = "@prefix owl: <http://www.w3.org/2002/07/owl#> .\n\
        @prefix ex: <http://example.org/> .\nex:Ship a owl:Class .\n";

    #[test]
    fn a_reload_offers_changed_files_and_keeps_the_versions_runs_pinned() {
        let dir = scratch();
        std::fs::write(dir.join("ships.ttl"), SMALL).expect("write");
        let ontologies = Ontologies::load(&dir).expect("loads");
        let handle = ontologies.clone();
        let first = ontologies.get("ships").expect("ships").version.clone();
        assert_eq!(ontologies.reload(), Reloaded::default(), "nothing changed");

        let changed = format!("{SMALL}ex:Port a owl:Class .\n");
        std::fs::write(dir.join("ships.ttl"), &changed).expect("write");
        std::fs::write(dir.join("ports.ttl"), SMALL).expect("write");
        let report = ontologies.reload();
        assert_eq!(report.changed, vec!["ports".to_owned(), "ships".to_owned()]);
        // Every clone sees the new current version; the pinned one is still there.
        let second = handle.get("ships").expect("ships").version.clone();
        assert_ne!(first, second);
        assert!(handle.version("ships", &first).is_some());
        assert_eq!(handle.ids(), vec!["foaf", "ports", "ships"]);

        // A broken file keeps its last good version; a removed one is not offered.
        std::fs::write(dir.join("ships.ttl"), "ex:Ship a").expect("write");
        std::fs::remove_file(dir.join("ports.ttl")).expect("remove");
        let report = ontologies.reload();
        assert_eq!(report.failed.len(), 1, "{report:?}");
        assert_eq!(report.removed, vec!["ports".to_owned()]);
        assert_eq!(handle.get("ships").expect("ships").version, second);
        assert!(handle.get("ports").is_none());
        assert!(
            handle.version("ports", &first).is_some(),
            "kept for pinned runs"
        );
        assert_eq!(handle.ids(), vec!["foaf", "ships"]);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn only_the_last_few_versions_are_kept() {
        let dir = scratch();
        let ontologies = Ontologies::load(&dir).expect("loads");
        let mut versions = Vec::new();
        for n in 0..KEPT_VERSIONS + 3 {
            std::fs::write(dir.join("ships.ttl"), format!("{SMALL}# {n}\n")).expect("write");
            ontologies.reload();
            versions.push(ontologies.get("ships").expect("ships").version.clone());
        }
        let kept: Vec<bool> = versions
            .iter()
            .map(|v| ontologies.version("ships", v).is_some())
            .collect();
        let expected: Vec<bool> = (0..versions.len())
            .map(|n| n + KEPT_VERSIONS + 1 >= versions.len())
            .collect();
        assert_eq!(kept, expected);
        std::fs::remove_dir_all(&dir).ok();
    }
}
