//! The built-in extractor: deterministic, offline, no key (the default provider, so
//! `shoal dev` extracts without one). Honest rules, not clever ones:
//!
//! - **Mentions** are runs of capitalised words (joined by `of`, `de`, `von`, `van`,
//!   `the`), without a leading stop word (`The`, `In`, `She`, …). A run holding a class's
//!   label as a word (the ontology's `rdfs:label`/`skos:altLabel` are the gazetteer:
//!   `University` → `foaf:Organization`, a title `Dr` → `foaf:Person`) gets that class; a
//!   run of two or three other words is a person (the class labelled `Person`); a single
//!   word that is part of an earlier mention (`Curie` after `Marie Curie`) is that mention
//!   again. Everything else is skipped.
//! - **Relations**: within a sentence, two mentions with a property's label between them
//!   (`worked at`, `founded`, `married`) state that property, subject first.

use std::collections::BTreeSet;

use futures::future::BoxFuture;

use super::{Call, Output, Provider, ProviderError, Reply, Task, Usage};
use crate::model::{Mention, StatedRelation};
use crate::ontology::Ontology;

/// Words that join the capitalised words of one name.
const JOINERS: &[&str] = &["of", "de", "von", "van", "the", "du", "la"];
/// Capitalised words that start sentences, not names.
const STOP: &[&str] = &[
    "The", "A", "An", "In", "On", "At", "She", "He", "They", "It", "His", "Her", "Their", "After",
    "Before", "During", "From", "With", "By", "For", "As", "When", "While", "This", "That",
    "There", "Later", "Born", "Its", "Both", "Together",
];
/// Words that make a capitalised run something other than a person.
const NOT_NAMES: &[&str] = &[
    "Prize",
    "Award",
    "War",
    "Street",
    "River",
    "Medal",
    "Revolution",
    "Empire",
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
    "Monday",
    "Sunday",
];
/// The longest gap between two mentions that can state a relation, bytes.
const MAX_GAP: usize = 80;

/// The built-in extractor.
#[derive(Debug, Clone, Default)]
pub struct Builtin;

impl Provider for Builtin {
    fn default_model(&self) -> &str {
        "rules-v1"
    }

    fn call<'a>(&'a self, call: &'a Call<'a>) -> BoxFuture<'a, Result<Reply, ProviderError>> {
        let output = match call.task {
            Task::Mentions { text } => Output::Mentions(mentions(text, call.ontology)),
            Task::Relations { text, entities } => {
                let names: Vec<Vec<String>> = entities
                    .iter()
                    .map(|e| {
                        let mut forms = e.mentions.clone();
                        forms.push(e.name.clone());
                        forms
                    })
                    .collect();
                let canonical: Vec<&str> = entities.iter().map(|e| e.name.as_str()).collect();
                Output::Relations(relations(text, call.ontology, &names, &canonical))
            }
        };
        let usage = Usage {
            input_tokens: call.task.text().len() as u64 / 4 + 1,
            output_tokens: 0,
        };
        Box::pin(async move { Ok(Reply { output, usage }) })
    }
}

/// A word of the text with its byte span.
struct Word<'t> {
    text: &'t str,
    start: usize,
    end: usize,
    /// A sentence ends after it.
    ends_sentence: bool,
}

fn words(text: &str) -> Vec<Word<'_>> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        let part = c.is_alphanumeric() || c == '-' || c == '\'';
        match (part, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push(Word {
                    text: &text[s..i],
                    start: s,
                    end: i,
                    ends_sentence: matches!(c, '.' | '!' | '?' | ';'),
                });
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push(Word {
            text: &text[s..],
            start: s,
            end: text.len(),
            ends_sentence: true,
        });
    }
    out
}

fn capitalised(word: &str) -> bool {
    word.chars().next().is_some_and(char::is_uppercase)
}

/// Capitalised runs: (start, end) byte spans.
fn runs(text: &str) -> Vec<(usize, usize)> {
    let words = words(text);
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        if !capitalised(words[i].text) || STOP.contains(&words[i].text) {
            i += 1;
            continue;
        }
        let first = i;
        let mut last = i;
        let mut j = i + 1;
        while j < words.len() && !words[j - 1].ends_sentence {
            if capitalised(words[j].text) {
                last = j;
                j += 1;
            } else if JOINERS.contains(&words[j].text)
                && words.get(j + 1).is_some_and(|w| capitalised(w.text))
                && !words[j].ends_sentence
            {
                j += 1;
            } else {
                break;
            }
        }
        out.push((words[first].start, words[last].end));
        i = last + 1;
    }
    out
}

/// The class a run's words name through the gazetteer, if any.
fn gazetteer_class<'o>(run: &str, ontology: &'o Ontology) -> Option<&'o str> {
    let words: BTreeSet<&str> = run.split_whitespace().collect();
    ontology
        .classes
        .iter()
        .find(|class| {
            class
                .labels
                .iter()
                .skip(1)
                .any(|label| words.contains(label.as_str()))
        })
        .map(|class| class.name.as_str())
}

fn person_class(ontology: &Ontology) -> Option<&str> {
    ontology.class("Person").map(|c| c.name.as_str())
}

/// Typed mentions in `text`, in order.
pub fn mentions(text: &str, ontology: &Ontology) -> Vec<Mention> {
    let mut found: Vec<Mention> = Vec::new();
    for (start, end) in runs(text) {
        let run = &text[start..end];
        let word_count = run.split_whitespace().count();
        let class = if let Some(class) = gazetteer_class(run, ontology) {
            Some(class.to_owned())
        } else if (2..=3).contains(&word_count)
            && !run.split_whitespace().any(|w| NOT_NAMES.contains(&w))
        {
            person_class(ontology).map(str::to_owned)
        } else if word_count == 1 {
            found
                .iter()
                .find(|m| m.text.split_whitespace().any(|w| w == run))
                .map(|m| m.class.clone())
        } else {
            None
        };
        if let Some(class) = class {
            // A title names the class; the name is what follows it.
            let text = strip_title(run, ontology);
            found.push(Mention { text, class });
        }
    }
    found
}

fn strip_title(run: &str, ontology: &Ontology) -> String {
    let Some(person) = ontology.class("Person") else {
        return run.to_owned();
    };
    match run.split_once(' ') {
        Some((first, rest)) if person.labels.iter().skip(1).any(|l| l == first) => rest.to_owned(),
        _ => run.to_owned(),
    }
}

/// Relations stated in `text` between entities known by `forms` (each entity's names),
/// answered with the entities' `canonical` names.
pub fn relations(
    text: &str,
    ontology: &Ontology,
    forms: &[Vec<String>],
    canonical: &[&str],
) -> Vec<StatedRelation> {
    // Each occurrence of a known name: (start, end, entity index), longest names first.
    let mut spans: Vec<(usize, usize, usize)> = Vec::new();
    for (index, names) in forms.iter().enumerate() {
        for name in names {
            for (at, _) in text.match_indices(name.as_str()) {
                spans.push((at, at + name.len(), index));
            }
        }
    }
    spans.sort_by_key(|&(start, end, _)| (start, std::cmp::Reverse(end)));
    let mut kept: Vec<(usize, usize, usize)> = Vec::new();
    for span in spans {
        if kept.last().is_none_or(|last| span.0 >= last.1) {
            kept.push(span);
        }
    }
    let mut out = Vec::new();
    for pair in kept.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if a.2 == b.2 || b.0 - a.1 > MAX_GAP {
            continue;
        }
        let between = text[a.1..b.0].to_lowercase();
        if between.contains(['.', ';', '!', '?']) {
            continue;
        }
        let stated = ontology.properties.iter().find(|p| {
            p.labels
                .iter()
                .any(|label| contains_phrase(&between, &label.to_lowercase()))
        });
        if let Some(property) = stated {
            let relation = StatedRelation {
                subject: canonical[a.2].to_owned(),
                predicate: property.name.clone(),
                object: canonical[b.2].to_owned(),
            };
            if !out.contains(&relation) {
                out.push(relation);
            }
        }
    }
    out
}

/// Whether `phrase` occurs in `text` as whole words.
fn contains_phrase(text: &str, phrase: &str) -> bool {
    text.match_indices(phrase).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + phrase.len()..].chars().next();
        !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ontology::Ontologies;

    fn foaf() -> std::sync::Arc<Ontology> {
        Ontologies::builtin()
            .expect("foaf")
            .get("foaf")
            .expect("foaf")
    }

    #[test]
    fn capitalised_phrases_typed_by_the_gazetteer() {
        let text = "Marie Curie worked at the University of Paris. In 1903 Curie shared \
                    the Nobel Prize with Pierre Curie.";
        let found = mentions(text, &foaf());
        let pairs: Vec<(&str, &str)> = found
            .iter()
            .map(|m| (m.text.as_str(), m.class.as_str()))
            .collect();
        assert!(pairs.contains(&("Marie Curie", "foaf:Person")), "{pairs:?}");
        assert!(
            pairs.contains(&("University of Paris", "foaf:Organization")),
            "{pairs:?}"
        );
        assert!(pairs.contains(&("Curie", "foaf:Person")), "{pairs:?}");
        assert!(
            pairs.contains(&("Pierre Curie", "foaf:Person")),
            "{pairs:?}"
        );
        assert!(!pairs.iter().any(|(t, _)| t.contains("Nobel")), "{pairs:?}");
    }

    #[test]
    fn phrases_between_mentions_state_relations() {
        let text = "Marie Curie worked at the University of Paris.";
        let forms = vec![
            vec!["Marie Curie".to_owned()],
            vec!["University of Paris".to_owned()],
        ];
        let found = relations(
            text,
            &foaf(),
            &forms,
            &["Marie Curie", "University of Paris"],
        );
        assert_eq!(
            found,
            vec![StatedRelation {
                subject: "Marie Curie".into(),
                predicate: "shoal:memberOf".into(),
                object: "University of Paris".into(),
            }]
        );
    }
}
