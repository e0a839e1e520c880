//! The stages' own logic, pure (no I/O): normalising and chunking, merging mentions into
//! grounded entities, checking relations against the ontology's domain and range.

use std::collections::BTreeMap;

use super::model::{Chunk, ExtractedEntity, ExtractedRelation, Mention, StatedRelation};
use super::ontology::Ontology;

// Defined with the ids, which are computed over the normalised text; the preprocess stage
// runs it from here.
pub use super::model::normalise;

/// Splits normalised `text` into chunks of at most `tokens` (about 4 bytes a token),
/// at sentence ends where it can, else at a space.
pub fn chunk(text: &str, tokens: u32) -> Vec<Chunk> {
    let budget = (tokens as usize * 4).max(64);
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + budget).min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        if end < text.len() {
            let window = &text[start..end];
            let cut = window
                .rfind(". ")
                .map(|i| i + 1)
                .or_else(|| window.rfind(' '))
                .filter(|&i| i > 0);
            if let Some(cut) = cut {
                end = start + cut;
            }
        }
        let piece = text[start..end].trim();
        if !piece.is_empty() {
            chunks.push(Chunk {
                start,
                text: piece.to_owned(),
            });
        }
        start = end;
    }
    chunks
}

/// Merges mentions into entities: the same text and class is one entity, and a mention
/// whose words all belong to a longer mention of the same class (`Curie` in `Marie
/// Curie`) is that entity too. Each entity is grounded to its class's IRI; mentions of a
/// class the ontology lacks are dropped.
pub fn resolve(mentions: &[Mention], ontology: &Ontology) -> Vec<ExtractedEntity> {
    let mut longest_first: Vec<&Mention> = mentions.iter().collect();
    longest_first.sort_by_key(|m| std::cmp::Reverse(m.text.split_whitespace().count()));
    let mut entities: Vec<ExtractedEntity> = Vec::new();
    let mut order: BTreeMap<String, usize> = BTreeMap::new();
    for (i, m) in mentions.iter().enumerate() {
        order.entry(m.text.clone()).or_insert(i);
    }
    for mention in longest_first {
        let Some(class) = ontology.class(&mention.class) else {
            continue;
        };
        let words: Vec<&str> = mention.text.split_whitespace().collect();
        let same = entities.iter_mut().find(|e| {
            e.class_iri == class.iri
                && (e.name == mention.text
                    || words
                        .iter()
                        .all(|w| e.name.split_whitespace().any(|x| x == *w)))
        });
        match same {
            Some(entity) => {
                if !entity.mentions.contains(&mention.text) {
                    entity.mentions.push(mention.text.clone());
                }
            }
            None => entities.push(ExtractedEntity {
                id: String::new(),
                name: mention.text.clone(),
                class: class.name.clone(),
                class_iri: class.iri.clone(),
                mentions: vec![mention.text.clone()],
            }),
        }
    }
    entities.sort_by_key(|e| order.get(&e.name).copied().unwrap_or(usize::MAX));
    for (i, entity) in entities.iter_mut().enumerate() {
        entity.id = format!("e{}", i + 1);
    }
    entities
}

/// The stated relations the ontology allows, between known entities (domain and range
/// checked through `rdfs:subClassOf`), each once; and how many were refused.
pub fn check_relations(
    stated: &[StatedRelation],
    entities: &[ExtractedEntity],
    ontology: &Ontology,
) -> (Vec<ExtractedRelation>, u32) {
    let mut kept: Vec<ExtractedRelation> = Vec::new();
    let mut rejected = 0;
    for relation in stated {
        let find = |name: &str| {
            entities
                .iter()
                .find(|e| e.name == name || e.mentions.iter().any(|m| m == name))
        };
        let (Some(subject), Some(object), Some(property)) = (
            find(&relation.subject),
            find(&relation.object),
            ontology.property(&relation.predicate),
        ) else {
            rejected += 1;
            continue;
        };
        let domain_ok = property
            .domain
            .as_ref()
            .is_none_or(|d| ontology.is_a(&subject.class_iri, d));
        let range_ok = property
            .range
            .as_ref()
            .is_none_or(|r| ontology.is_a(&object.class_iri, r));
        if !domain_ok || !range_ok || subject.id == object.id {
            rejected += 1;
            continue;
        }
        let relation = ExtractedRelation {
            subject: subject.id.clone(),
            predicate: property.name.clone(),
            predicate_iri: property.iri.clone(),
            object: object.id.clone(),
        };
        if !kept.contains(&relation) {
            kept.push(relation);
        }
    }
    (kept, rejected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ontology::Ontologies;

    fn mention(text: &str, class: &str) -> Mention {
        Mention {
            text: text.into(),
            class: class.into(),
        }
    }

    #[test]
    fn normalising_composes_and_collapses_whitespace() {
        assert_eq!(
            normalise("  Marie\u{a0}Cu\u{301}rie \n\t worked "),
            "Marie Cúrie worked"
        );
        assert_eq!(normalise("Cafe\u{301}"), normalise("Caf\u{e9}"));
        assert_eq!(normalise("Caf\u{e9}"), "Caf\u{e9}");
    }

    #[test]
    fn chunks_cut_at_sentences_within_the_budget() {
        let text = normalise(&"One sentence here.  Another one there. ".repeat(40));
        let chunks = chunk(&text, 32);
        assert!(chunks.len() > 1);
        for c in &chunks {
            assert!(c.text.len() <= 128, "{}", c.text.len());
            assert!(c.text.ends_with('.'), "{:?}", c.text);
        }
    }

    #[test]
    fn mentions_merge_and_relations_are_domain_and_range_checked() {
        let ontologies = Ontologies::builtin().expect("foaf");
        let foaf = ontologies.get("foaf").expect("foaf");
        let mentions = [
            mention("Marie Curie", "foaf:Person"),
            mention("University of Paris", "foaf:Organization"),
            mention("Curie", "foaf:Person"),
        ];
        let entities = resolve(&mentions, &foaf);
        assert_eq!(entities.len(), 2, "{entities:?}");
        assert_eq!(entities[0].name, "Marie Curie");
        assert_eq!(entities[0].mentions, vec!["Marie Curie", "Curie"]);
        let stated = [
            StatedRelation {
                subject: "Curie".into(),
                predicate: "shoal:memberOf".into(),
                object: "University of Paris".into(),
            },
            // Range is foaf:Organization: a person is refused.
            StatedRelation {
                subject: "University of Paris".into(),
                predicate: "shoal:memberOf".into(),
                object: "Marie Curie".into(),
            },
        ];
        let (kept, rejected) = check_relations(&stated, &entities, &foaf);
        assert_eq!(rejected, 1);
        assert_eq!(kept.len(), 1);
        assert_eq!(
            (kept[0].subject.as_str(), kept[0].object.as_str()),
            ("e1", "e2")
        );
    }
}
