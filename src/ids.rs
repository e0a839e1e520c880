//! Newtype identifiers. Every id in Shoal has its own type with a validated constructor,
//! `Display` and `FromStr`, so a shard can never be passed where a runner is expected and
//! a malformed name is refused where it enters the system.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a string or number was refused as an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The value was empty.
    #[error("{kind} must not be empty")]
    Empty {
        /// Which kind of id.
        kind: &'static str,
    },
    /// The value was longer than allowed.
    #[error("{kind} is {len} bytes long; the limit is {max}")]
    TooLong {
        /// Which kind of id.
        kind: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value held a character outside the allowed set.
    #[error("{kind} {value:?} may only contain {allowed}")]
    BadCharacter {
        /// Which kind of id.
        kind: &'static str,
        /// The refused value.
        value: String,
        /// A description of the allowed set.
        allowed: &'static str,
    },
    /// The value is not a number in range.
    #[error("{kind} {value:?} is not a valid number")]
    NotANumber {
        /// Which kind of id.
        kind: &'static str,
        /// The refused value.
        value: String,
    },
}

fn check_name(
    kind: &'static str,
    value: &str,
    max: usize,
    allowed: &'static str,
    ok: impl Fn(char) -> bool,
) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > max {
        return Err(IdError::TooLong {
            kind,
            len: value.len(),
            max,
        });
    }
    if !value.chars().all(ok) {
        return Err(IdError::BadCharacter {
            kind,
            value: value.to_owned(),
            allowed,
        });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$meta:meta])* $name:ident, $kind:literal, $max:expr, $allowed:literal, $ok:expr) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check_name($kind, &value, $max, $allowed, $ok)?;
                Ok(Self(value))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = IdError;
            fn try_from(value: &str) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }
    };
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

string_id!(
    /// The name of a cluster. Lock keys are namespaced by it, so two clusters can share a
    /// database.
    ClusterName,
    "cluster name",
    63,
    "ASCII letters, digits, '-' and '_'",
    is_name_char
);

string_id!(
    /// A kind of entity: `counter`, `job`, `extraction`, or a user's own.
    EntityType,
    "entity type",
    63,
    "ASCII letters, digits, '-' and '_'",
    is_name_char
);

string_id!(
    /// An entity's id, chosen by the caller. Any printable text without control characters.
    EntityId,
    "entity id",
    512,
    "printable characters (no control characters)",
    |c: char| !c.is_control()
);

impl Default for ClusterName {
    fn default() -> Self {
        Self("shoal".to_owned())
    }
}

/// An entity's address: its type and id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EntityAddress {
    /// The entity's type.
    pub entity_type: EntityType,
    /// The entity's id.
    pub entity_id: EntityId,
}

impl fmt::Display for EntityAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.entity_type, self.entity_id)
    }
}

/// A shard number, in `0..shards_per_group`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ShardId(u32);

impl ShardId {
    /// Wraps a shard number. Range is checked against the cluster's shard count where shards
    /// enter the system (`Sharding::shard`), not here.
    pub const fn new(value: u32) -> Self {
        Self(value)
    }

    /// The shard number.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The shard number as the `int4` half of an advisory-lock key.
    pub fn lock_key(self) -> i32 {
        // Shard counts are validated to be at most i32::MAX at start-up.
        i32::try_from(self.0).unwrap_or(i32::MAX)
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for ShardId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self).map_err(|_| IdError::NotANumber {
            kind: "shard id",
            value: s.to_owned(),
        })
    }
}

/// A runner incarnation's id, assigned by registration. A runner that restarts, or rejoins
/// after fencing itself, is a new incarnation with a new id. It is also the second half of
/// the runner's liveness lock key, so it stays within `int4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunnerId(i32);

impl RunnerId {
    /// Wraps a registered runner id (positive).
    pub fn new(value: i32) -> Result<Self, IdError> {
        if value > 0 {
            Ok(Self(value))
        } else {
            Err(IdError::NotANumber {
                kind: "runner id",
                value: value.to_string(),
            })
        }
    }

    /// The id as stored.
    pub const fn get(self) -> i32 {
        self.0
    }
}

impl fmt::Display for RunnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for RunnerId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let value: i32 = s.parse().map_err(|_| IdError::NotANumber {
            kind: "runner id",
            value: s.to_owned(),
        })?;
        Self::new(value)
    }
}

/// How many times a shard has changed owner. Grows by one on every acquisition; writes that
/// complete work for a shard carry the epoch they were made under (fencing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(i64);

impl Epoch {
    /// Wraps an epoch read from storage.
    pub const fn new(value: i64) -> Self {
        Self(value)
    }

    /// The epoch number.
    pub const fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A persisted message's id (a snowflake: time-ordered, unique per cluster).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(i64);

impl MessageId {
    /// Wraps a stored id.
    pub const fn new(value: i64) -> Self {
        Self(value)
    }

    /// The id as stored.
    pub const fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for MessageId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self).map_err(|_| IdError::NotANumber {
            kind: "message id",
            value: s.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(ClusterName::new("prod-eu_1").is_ok());
        assert!(matches!(ClusterName::new(""), Err(IdError::Empty { .. })));
        assert!(matches!(
            ClusterName::new("a b"),
            Err(IdError::BadCharacter { .. })
        ));
        assert!(matches!(
            EntityType::new("x".repeat(64)),
            Err(IdError::TooLong { .. })
        ));
        assert!(EntityId::new("user:42/é").is_ok());
        assert!(EntityId::new("bad\u{0}").is_err());
    }

    #[test]
    fn runner_ids_are_positive() {
        assert!(RunnerId::new(0).is_err());
        assert_eq!("7".parse::<RunnerId>().map(RunnerId::get), Ok(7));
        assert!("x".parse::<RunnerId>().is_err());
    }

    #[test]
    fn ids_round_trip_through_serde() {
        let id = EntityId::new("abc").expect("valid");
        let json = serde_json::to_string(&id).expect("serializes");
        assert_eq!(json, "\"abc\"");
        assert!(serde_json::from_str::<EntityType>("\"no spaces\"").is_err());
    }
}
