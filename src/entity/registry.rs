//! The entity types a node knows, by name. Registration is where a type's constant name
//! and its options are validated, once: a bad one is a [`RegistryError`], never a panic.

use std::collections::HashMap;
use std::sync::Arc;

use super::erased::{ErasedEntity, Registered, RegisteredConcurrent};
use super::{ConcurrentEntity, Entity, EntityProtocol};
use crate::ids::EntityType;

/// Why a type could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The name is taken.
    #[error("entity type `{0}` is registered twice")]
    Duplicate(EntityType),
    /// The type's `NAME` is not a valid entity type name.
    #[error("entity type name `{name}`: {problem}")]
    BadName {
        /// The constant as written.
        name: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// An option is out of range.
    #[error("entity type `{entity_type}`: {problem}")]
    BadOptions {
        /// The type.
        entity_type: EntityType,
        /// What is wrong.
        problem: String,
    },
}

/// The entity types a node knows.
#[derive(Debug, Clone, Default)]
pub struct EntityRegistry {
    types: HashMap<EntityType, Arc<dyn ErasedEntity>>,
}

/// `E::NAME` as an [`EntityType`], or why not.
fn name_of<E: EntityProtocol>() -> Result<EntityType, RegistryError> {
    EntityType::new(E::NAME).map_err(|e| RegistryError::BadName {
        name: E::NAME,
        problem: e.to_string(),
    })
}

impl EntityRegistry {
    /// No types.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers an entity type that handles one message at a time.
    pub fn register<E: Entity>(&mut self, entity: E) -> Result<&mut Self, RegistryError> {
        let entity_type = name_of::<E>()?;
        let options = entity.options();
        self.insert(Arc::new(Registered {
            entity,
            entity_type,
            options,
        }))
    }

    /// Registers an entity type whose handlers run side by side.
    pub fn register_concurrent<E: ConcurrentEntity>(
        &mut self,
        entity: E,
    ) -> Result<&mut Self, RegistryError> {
        let entity_type = name_of::<E>()?;
        if E::CONCURRENCY == 0 {
            return Err(RegistryError::BadOptions {
                entity_type,
                problem: "CONCURRENCY must be at least 1".to_owned(),
            });
        }
        let options = entity.options();
        self.insert(Arc::new(RegisteredConcurrent {
            entity,
            entity_type,
            options,
        }))
    }

    fn insert(&mut self, entity: Arc<dyn ErasedEntity>) -> Result<&mut Self, RegistryError> {
        let entity_type = entity.entity_type().clone();
        if self.types.contains_key(&entity_type) {
            return Err(RegistryError::Duplicate(entity_type));
        }
        self.types.insert(entity_type, entity);
        Ok(self)
    }

    /// A registered type.
    pub(crate) fn get(&self, entity_type: &EntityType) -> Option<&Arc<dyn ErasedEntity>> {
        self.types.get(entity_type)
    }

    /// Whether a type of this name is registered.
    pub fn contains(&self, entity_type: &EntityType) -> bool {
        self.types.contains_key(entity_type)
    }

    /// Removes a type; returns whether it was registered.
    pub fn remove(&mut self, entity_type: &EntityType) -> bool {
        self.types.remove(entity_type).is_some()
    }

    /// Every registered type name.
    pub fn names(&self) -> impl Iterator<Item = &EntityType> {
        self.types.keys()
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::entity::{ActivationContext, DecodeError, EntityContext, HandlerError};
    use crate::entity::{EntityProtocol, encode_message};
    use crate::ids::{EntityAddress, EntityId, Epoch, ShardId};

    #[derive(Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
    #[serde(rename_all = "snake_case")]
    enum Msg {
        Add { amount: i64 },
        Get,
    }

    struct Adder;

    impl EntityProtocol for Adder {
        const NAME: &'static str = "adder";
        type Message = Msg;
        type Reply = i64;
        fn is_persisted(message: &Msg) -> bool {
            matches!(message, Msg::Add { .. })
        }
    }

    impl Entity for Adder {
        type State = i64;
        async fn handle(
            &self,
            _: &EntityContext,
            state: &mut i64,
            message: Msg,
        ) -> Result<i64, HandlerError> {
            if let Msg::Add { amount } = message {
                *state += amount;
            }
            Ok(*state)
        }
    }

    #[test]
    fn messages_split_into_tag_and_body() {
        assert_eq!(
            encode_message(&Msg::Add { amount: 2 }).expect("encodes"),
            ("add".to_owned(), serde_json::json!({"amount": 2}))
        );
        assert_eq!(
            encode_message(&Msg::Get).expect("encodes"),
            ("get".to_owned(), serde_json::Value::Null)
        );
    }

    #[tokio::test]
    async fn erased_entities_decode_and_handle() {
        let mut registry = EntityRegistry::new();
        registry.register(Adder).expect("registers");
        let adder = registry
            .get(&EntityType::new("adder").expect("valid"))
            .expect("registered")
            .clone();
        let address = EntityAddress {
            entity_type: adder.entity_type().clone(),
            entity_id: EntityId::new("a").expect("valid"),
        };
        let activation = ActivationContext {
            address: address.clone(),
            shard: ShardId::new(0),
            epoch: Epoch::new(1),
            runner_id: None,
        };
        let ctx = EntityContext {
            address,
            shard: ShardId::new(0),
            epoch: Epoch::new(1),
            runner_id: None,
            message_id: None,
            attempts: 0,
            calls: crate::entity::context::Calls::default(),
        };
        let mut state = adder
            .activate(&activation, Some(serde_json::json!(40)))
            .await
            .expect("state");
        let add = adder
            .decode("add", serde_json::json!({"amount": 2}))
            .expect("decodes");
        assert!(adder.is_persisted(&add));
        let reply = adder.handle(&ctx, &mut state, add).await.expect("handled");
        assert_eq!(reply, serde_json::json!(42));
        let get = adder
            .decode("get", serde_json::json!({}))
            .expect("unit variant");
        assert!(!adder.is_persisted(&get));

        assert!(matches!(
            adder.decode("nope", serde_json::json!({})),
            Err(DecodeError::UnknownMessage { .. })
        ));
        let Err(DecodeError::InvalidBody { problem, .. }) =
            adder.decode("add", serde_json::json!({"amount": "two"}))
        else {
            panic!("a string amount must be refused");
        };
        assert!(problem.contains("field `amount`"), "{problem}");
        assert!(problem.contains("invalid type"), "{problem}");
        assert!(matches!(
            registry.register(Adder),
            Err(RegistryError::Duplicate(_))
        ));
    }

    struct BadlyNamed;

    impl EntityProtocol for BadlyNamed {
        const NAME: &'static str = "not a name!";
        type Message = Msg;
        type Reply = i64;
        fn is_persisted(_: &Msg) -> bool {
            false
        }
    }

    impl Entity for BadlyNamed {
        type State = i64;
        async fn handle(
            &self,
            _: &EntityContext,
            _: &mut i64,
            _: Msg,
        ) -> Result<i64, HandlerError> {
            Ok(0)
        }
    }

    #[test]
    fn the_registry_refuses_a_bad_constant_name() {
        let mut registry = EntityRegistry::new();
        let refused = registry.register(BadlyNamed).expect_err("refused");
        let RegistryError::BadName { name, problem } = &refused else {
            panic!("expected BadName, got {refused:?}");
        };
        assert_eq!(*name, "not a name!");
        assert!(!problem.is_empty());
        assert!(refused.to_string().contains("not a name!"), "{refused}");
        assert_eq!(registry.names().count(), 0);
    }
}
