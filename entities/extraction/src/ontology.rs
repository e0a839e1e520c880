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
//!
//! - `ontology/vocabulary.rs`: what an ontology is reduced to ([`Ontology`], its classes
//!   and properties, the lookups by name and through `rdfs:subClassOf`) and
//!   [`OntologyError`].
//! - `ontology/turtle.rs`: reading one: the Turtle parser ([`Ontology::parse`]), the
//!   directory's files, the compiled-in `foaf` ([`DEFAULT_FOAF`]).
//! - this file: the registry of every ontology a node knows ([`Ontologies`]): the versions
//!   of each id, reloads, and the adoption of versions other nodes stored.

mod turtle;
mod vocabulary;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};

use turtle::read_dir;

pub use turtle::DEFAULT_FOAF;
pub use vocabulary::{Ontology, OntologyClass, OntologyError, OntologyProperty};

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
