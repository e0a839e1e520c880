//! What an extraction is made of: its request, its content-addressed id (over the
//! normalised text: [`normalise`]), its stages, the stages' outputs and the final result,
//! and the typed failure.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

/// Longest text accepted, in bytes.
pub const MAX_TEXT_CHARS: usize = 200_000;

/// The whitespace of Rust's `char::is_whitespace`, as a JSON Schema character class body.
const WHITESPACE: &str =
    "\\t\\n\\u000B\\f\\r \\u0085\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000";

/// The schema of a text: 1 to [`MAX_TEXT_CHARS`] characters, no NUL (storage cannot hold
/// one), not all whitespace. Each pattern is linear to check.
pub fn text_schema_json() -> serde_json::Value {
    serde_json::json!({
        "type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS,
        // Refusals under `not` (no positive pattern): schemathesis 4 cannot draw a text for
        // a pattern beside a `maxLength` this long.
        "not": {"anyOf": [
            {"pattern": format!("^[{WHITESPACE}]*$")},
            {"pattern": "\\u0000"},
        ]},
    })
}

/// An extraction's id: `ex-` and the first 32 hex digits of the SHA-256 over the
/// normalised text (NFC, whitespace runs one space: [`normalise`], what the stages
/// read), provider, model, ontology version and temperature (each length-prefixed), and,
/// for a tenant's extraction, the tenant: so the same inputs of one tenant are the same
/// entity, and another tenant's, another model or ontology version another one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExtractionId(String);

impl ExtractionId {
    /// The content address of these inputs in `scope` (the tenant whose extraction it is;
    /// `None` for a caller without one, or with `[extraction] shared-cache`).
    pub fn of(scope: Option<&str>, inputs: Inputs<'_>) -> Self {
        let Inputs {
            text,
            provider,
            model,
            ontology_version,
            temperature,
        } = inputs;
        let mut hash = Sha256::new();
        if let Some(tenant) = scope {
            // A prefix no unscoped input starts with (its first 8 bytes are the text's
            // length, which these bytes would make petabytes), so a tenant's ids never
            // meet the unscoped ones.
            hash.update(b"tenant\0");
            hash.update((tenant.len() as u64).to_le_bytes());
            hash.update(tenant.as_bytes());
        }
        let temperature = format!("{temperature:.3}");
        let text = normalise(text);
        for part in [
            text.as_str(),
            provider,
            model,
            ontology_version,
            temperature.as_str(),
        ] {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part.as_bytes());
        }
        Self(format!("ex-{}", &hex::encode(hash.finalize())[..32]))
    }

    /// What [`ExtractionId::parse`] takes, as a JSON Schema pattern.
    pub const PATTERN: &'static str = "^ex-[0-9a-f]{32}$";

    /// Parses an id (`ex-` and 32 lowercase hex digits).
    pub fn parse(text: &str) -> Option<Self> {
        let hex = text.strip_prefix("ex-")?;
        (hex.len() == 32
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| Self(text.to_owned()))
    }

    /// The id as text (also the entity id).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `text` in Unicode Normalization Form C (a composed `é` and `e` + combining acute are
/// one text), with runs of whitespace made one space, trimmed.
pub fn normalise(text: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let composed: String = text.nfc().collect();
    composed.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What an extraction's id is computed over, besides its scope.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// The text (normalised before hashing).
    pub text: &'a str,
    /// The provider.
    pub provider: &'a str,
    /// The model.
    pub model: &'a str,
    /// The pinned ontology version.
    pub ontology_version: &'a str,
    /// The temperature (3 decimals count).
    pub temperature: f64,
}

impl fmt::Display for ExtractionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What `POST /extractions` asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewExtraction {
    /// The text: at most 200,000 characters, not blank.
    #[schema(schema_with = text_schema)]
    pub text: String,
    /// The ontology's id (a file in `cluster-config/ontologies/`; `foaf` is built in).
    pub ontology_id: String,
    /// Provider options.
    #[serde(default, deserialize_with = "shoal::gateway::object_only")]
    pub options: ExtractionOptions,
}

fn text_schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    shoal::gateway::openapi::object_schema(text_schema_json())
}

/// Provider options of an extraction.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtractionOptions {
    /// A configured provider (default `[extraction] default-provider`, `builtin`).
    #[serde(default)]
    pub provider: Option<String>,
    /// The model (default: the provider's): 1–128 characters.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 128)]
    pub model: Option<String>,
    /// Sampling temperature, 0–2 (default 0).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f64>,
    /// Largest completion per provider call, tokens (default 1024).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 32768)]
    pub max_tokens: Option<u32>,
}

/// A request as the entity runs it: every default filled in, the ontology pinned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtractionRequest {
    /// The text.
    pub text: String,
    /// The ontology's id.
    pub ontology_id: String,
    /// The ontology's version (content hash) the id was computed with.
    pub ontology_version: String,
    /// The provider.
    pub provider: String,
    /// The model.
    pub model: String,
    /// The temperature.
    pub temperature: f64,
    /// Largest completion per call.
    pub max_tokens: u32,
    /// The tenant that asked (the first one, with a shared cache): its stream gets the
    /// steps, and only it reads the extraction.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Set by a gateway with `[extraction] shared-cache = true`: the id leaves the tenant
    /// out, so every tenant's same inputs are one extraction.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
}

impl ExtractionRequest {
    /// The request's content address (in its tenant's scope unless `shared`).
    pub fn id(&self) -> ExtractionId {
        let scope = if self.shared {
            None
        } else {
            self.tenant.as_deref()
        };
        ExtractionId::of(
            scope,
            Inputs {
                text: &self.text,
                provider: &self.provider,
                model: &self.model,
                ontology_version: &self.ontology_version,
                temperature: self.temperature,
            },
        )
    }
}

/// The pipeline's stages, in order.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Normalise the text and chunk it by a token budget (local).
    Preprocess,
    /// Mentions typed by the ontology's classes (the provider, per chunk).
    Entities,
    /// Merge mentions into entities grounded to classes (local).
    Resolve,
    /// Relations typed by the ontology's properties, domain and range checked (the
    /// provider, per chunk).
    Relations,
    /// Store the result (Postgres, then the cache).
    Persist,
}

impl Stage {
    /// Every stage, in order.
    pub const ALL: [Stage; 5] = [
        Stage::Preprocess,
        Stage::Entities,
        Stage::Resolve,
        Stage::Relations,
        Stage::Persist,
    ];

    /// The stage's name.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Preprocess => "preprocess",
            Stage::Entities => "entities",
            Stage::Resolve => "resolve",
            Stage::Relations => "relations",
            Stage::Persist => "persist",
        }
    }

    /// The stage after this one.
    pub fn next(self) -> Option<Stage> {
        let i = Self::ALL.iter().position(|s| *s == self)?;
        Self::ALL.get(i + 1).copied()
    }

    /// Percent done once this stage is finished.
    pub fn percent(self) -> u8 {
        let i = Self::ALL.iter().position(|s| *s == self).unwrap_or(0);
        ((i + 1) * 100 / Self::ALL.len()) as u8
    }

    /// Whether the stage calls the provider.
    pub fn calls_provider(self) -> bool {
        matches!(self, Stage::Entities | Stage::Relations)
    }
}

/// A chunk of the normalised text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Byte offset in the normalised text.
    pub start: usize,
    /// The chunk's text.
    pub text: String,
}

/// A mention the provider found: a span of text typed by a class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Mention {
    /// The text as written.
    pub text: String,
    /// The class's compact name (`foaf:Person`).
    #[serde(rename = "type")]
    pub class: String,
}

/// An entity of the result: mentions merged, grounded to a class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExtractedEntity {
    /// `e1`, `e2`, … in order of first mention.
    pub id: String,
    /// The longest mention's text.
    pub name: String,
    /// The class's compact name (`foaf:Person`).
    #[serde(rename = "type")]
    pub class: String,
    /// The class's IRI.
    pub class_iri: String,
    /// How it was written, each form once.
    pub mentions: Vec<String>,
}

/// A relation the provider stated between two mentions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StatedRelation {
    /// The subject, as named.
    pub subject: String,
    /// The property's compact name.
    pub predicate: String,
    /// The object, as named.
    pub object: String,
}

/// A relation of the result, between two entities, domain and range checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExtractedRelation {
    /// The subject entity's id.
    pub subject: String,
    /// The property's compact name.
    pub predicate: String,
    /// The property's IRI.
    pub predicate_iri: String,
    /// The object entity's id.
    pub object: String,
}

/// An extraction's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExtractionResult {
    /// The extraction.
    pub id: String,
    /// The ontology and its version.
    pub ontology_id: String,
    /// The ontology's version.
    pub ontology_version: String,
    /// The provider and model that produced it.
    pub provider: String,
    /// The model.
    pub model: String,
    /// The entities.
    pub entities: Vec<ExtractedEntity>,
    /// The relations.
    pub relations: Vec<ExtractedRelation>,
    /// Relations the provider stated that the ontology's domain or range refuses.
    pub rejected_relations: u32,
}

/// What kind of failure ended an extraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The provider refused or kept failing.
    Provider,
    /// The ontology is unknown here or changed.
    Ontology,
    /// A stage ran out of time on every attempt.
    Timeout,
    /// The provider's output never validated.
    InvalidOutput,
}

/// Why an extraction failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExtractionFailure {
    /// The kind.
    pub kind: FailureKind,
    /// The stage it failed in.
    pub stage: Stage,
    /// What happened.
    pub message: String,
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_declared_text_and_id_are_what_the_parsers_take() {
        let text = jsonschema::validator_for(&super::text_schema_json()).expect("compiles");
        for sample in [
            "",
            " ",
            "\t\n",
            "\u{85}",
            "\u{a0}x",
            "\u{3000}",
            "\u{feff}",
            "\u{200b}",
            "x",
            " x ",
            "\u{2028}\u{2029}",
            "\u{180e}",
            "x\0",
            "\0",
        ] {
            let taken = !sample.chars().all(char::is_whitespace) && !sample.contains('\0');
            assert_eq!(
                text.is_valid(&serde_json::json!(sample)),
                taken,
                "{sample:?}"
            );
        }
        let id = jsonschema::validator_for(
            &serde_json::json!({"type": "string", "pattern": super::ExtractionId::PATTERN}),
        )
        .expect("compiles");
        let hex = "0123456789abcdef0123456789abcdef";
        for sample in [
            format!("ex-{hex}"),
            format!("ex-{}", hex.to_uppercase()),
            format!("ex-{hex}0"),
            format!("ex-{}", &hex[1..]),
            hex.to_owned(),
            format!("ex-{hex}\n"),
        ] {
            assert_eq!(
                id.is_valid(&serde_json::json!(sample)),
                super::ExtractionId::parse(&sample).is_some(),
                "{sample:?}"
            );
        }
    }

    use super::*;

    fn id(
        text: &str,
        provider: &str,
        model: &str,
        version: &str,
        temperature: f64,
    ) -> ExtractionId {
        scoped(None, text, provider, model, version, temperature)
    }

    fn scoped(
        tenant: Option<&str>,
        text: &str,
        provider: &str,
        model: &str,
        ontology_version: &str,
        temperature: f64,
    ) -> ExtractionId {
        let inputs = Inputs {
            text,
            provider,
            model,
            ontology_version,
            temperature,
        };
        ExtractionId::of(tenant, inputs)
    }

    #[test]
    fn the_id_is_a_content_address_of_every_input() {
        let a = id("text", "builtin", "m", "v1", 0.0);
        assert_eq!(a, id("text", "builtin", "m", "v1", 0.0));
        assert_ne!(a, id("text", "builtin", "m2", "v1", 0.0));
        assert_ne!(a, id("text", "builtin", "m", "v2", 0.0));
        assert_ne!(a, id("text", "builtin", "m", "v1", 0.5));
        assert_ne!(a, id("text", "openai", "m", "v1", 0.0));
        assert_ne!(a, id("textb", "builtin", "m", "v1", 0.0));
        // One text however it is encoded or spaced.
        assert_eq!(
            id("Caf\u{e9} ouvert", "builtin", "m", "v1", 0.0),
            id(" Cafe\u{301}\n ouvert", "builtin", "m", "v1", 0.0)
        );
        // Length prefixes: moving a byte between fields changes the id.
        assert_ne!(id("ab", "c", "m", "v", 0.0), id("a", "bc", "m", "v", 0.0));
        assert_eq!(ExtractionId::parse(a.as_str()), Some(a));
        assert_eq!(ExtractionId::parse("ex-xyz"), None);
    }

    #[test]
    fn a_tenant_is_part_of_the_id() {
        let of = |tenant| scoped(tenant, "text", "builtin", "m", "v1", 0.0);
        let (acme, beta, none) = (of(Some("acme")), of(Some("beta")), of(None));
        assert_eq!(acme, of(Some("acme")));
        assert_ne!(acme, beta);
        assert_ne!(acme, none);
        assert!(
            ExtractionId::parse(acme.as_str()).is_some(),
            "the same shape"
        );
        let mut request = ExtractionRequest {
            text: "text".to_owned(),
            ontology_id: "foaf".to_owned(),
            ontology_version: "v1".to_owned(),
            provider: "builtin".to_owned(),
            model: "m".to_owned(),
            temperature: 0.0,
            max_tokens: 1,
            tenant: Some("acme".to_owned()),
            shared: false,
        };
        assert_eq!(request.id(), acme);
        request.shared = true;
        assert_eq!(request.id(), none, "a shared cache leaves the tenant out");
    }

    #[test]
    fn stages_run_in_order() {
        assert_eq!(Stage::Preprocess.next(), Some(Stage::Entities));
        assert_eq!(Stage::Persist.next(), None);
        assert_eq!(Stage::Persist.percent(), 100);
        assert_eq!(Stage::Preprocess.percent(), 20);
    }
}
