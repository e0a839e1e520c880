//! The OpenAPI schemas of a registered type's messages and reply, derived from its Rust
//! types (`utoipa::ToSchema`), for the gateway's document. The runtime only carries them;
//! the gateway splits the message enum into one body schema per message.

use utoipa::ToSchema;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::Schema;

/// What an entity type's Rust types say its messages and reply look like.
#[derive(Debug, Clone)]
pub struct EntitySchemas {
    /// The message enum (externally tagged: each variant is `{"<message>": body}`, or the
    /// bare name for a unit variant).
    pub message: RefOr<Schema>,
    /// The reply.
    pub reply: RefOr<Schema>,
    /// The named schemas the two refer to (`#/components/schemas/<name>`).
    pub components: Vec<(String, RefOr<Schema>)>,
}

impl EntitySchemas {
    /// The schemas of message type `M` and reply type `R`.
    pub(crate) fn of<M: ToSchema, R: ToSchema>() -> Self {
        let mut components = Vec::new();
        M::schemas(&mut components);
        R::schemas(&mut components);
        Self {
            message: M::schema(),
            reply: R::schema(),
            components,
        }
    }
}
