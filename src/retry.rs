//! Retry classes: what sending a failed request again can do.
//!
//! "May succeed later" is not enough for a caller: a resend that runs the work a second time
//! is a different risk from one that cannot. Every client-facing error
//! ([`DeliveryError`](crate::transport::DeliveryError), [`crate::transport::TransportError`], [`crate::client::ClientError`],
//! the gateway's `ApiError`) answers [`RetryClass`] through one exhaustive `match`, so a new
//! variant cannot compile until someone decides what a resend of it does.
//!
//! A [`DeliveryError`](crate::transport::DeliveryError) is classified as seen by a *volatile* delivery (the message lives
//! only in the request). A persisted ask surfaces delivery errors only when they are
//! [`RetryClass::Never`]; every other delivery failure of a stored message is retried by
//! the client until the deadline and then reported as a timeout naming the stored message.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What sending the same request again can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RetryClass {
    /// Nothing ran and nothing was stored: resend freely.
    Safe,
    /// The message is (or may be) stored and will run: resend with the same idempotency key
    /// (or read the reply by message id) and storage deduplicates it. A resend without the
    /// key may run the work twice.
    SafeWithSameKey,
    /// A volatile message that may have run: a resend may run it a second time.
    MayRunTwice,
    /// Final: a resend gets the same answer.
    Never,
}

impl RetryClass {
    /// Whether a resend may get a different answer (the `retryable` flag of the HTTP body).
    pub fn is_retryable(self) -> bool {
        match self {
            Self::Safe | Self::SafeWithSameKey | Self::MayRunTwice => true,
            Self::Never => false,
        }
    }

    /// The class for a caller who sent no idempotency key and cannot read the reply by
    /// message id (an HTTP caller): "resend with the same key" is not open to it, so a
    /// stored message's resend may run twice.
    pub fn without_key(self) -> Self {
        match self {
            Self::SafeWithSameKey => Self::MayRunTwice,
            other => other,
        }
    }

    /// The wire name (`safe`, `safe_with_same_key`, `may_run_twice`, `never`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Safe => "safe",
            Self::SafeWithSameKey => "safe_with_same_key",
            Self::MayRunTwice => "may_run_twice",
            Self::Never => "never",
        }
    }
}

impl std::fmt::Display for RetryClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::client::ClientError;
    use crate::ids::{MessageId, ShardId};
    use crate::message_storage::MessageStorageError;
    use crate::transport::DeliveryError;
    use crate::transport::TransportError;

    #[test]
    fn retryable_is_everything_but_never() {
        for class in [
            RetryClass::Safe,
            RetryClass::SafeWithSameKey,
            RetryClass::MayRunTwice,
        ] {
            assert!(class.is_retryable(), "{class}");
        }
        assert!(!RetryClass::Never.is_retryable());
    }

    #[test]
    fn wire_names_match_serde() {
        for class in [
            RetryClass::Safe,
            RetryClass::SafeWithSameKey,
            RetryClass::MayRunTwice,
            RetryClass::Never,
        ] {
            assert_eq!(
                serde_json::to_value(class).expect("serializes"),
                serde_json::json!(class.as_str())
            );
        }
    }

    #[test]
    fn without_a_key_a_stored_message_may_run_twice() {
        assert_eq!(
            RetryClass::SafeWithSameKey.without_key(),
            RetryClass::MayRunTwice
        );
        assert_eq!(RetryClass::Safe.without_key(), RetryClass::Safe);
        assert_eq!(RetryClass::Never.without_key(), RetryClass::Never);
    }

    #[test]
    fn every_delivery_error_has_its_class() {
        let shard = ShardId::new(3);
        let cases = [
            (DeliveryError::NotOwner(shard), RetryClass::Safe),
            (DeliveryError::ShardMoving(shard), RetryClass::Safe),
            (
                DeliveryError::MailboxFull("probe/x".into()),
                RetryClass::Safe,
            ),
            (DeliveryError::Overloaded, RetryClass::Safe),
            (
                DeliveryError::UnknownEntityType("x".into()),
                RetryClass::Never,
            ),
            (DeliveryError::BadMessage("bad".into()), RetryClass::Never),
            (
                DeliveryError::HandlerFailed("panic".into()),
                RetryClass::MayRunTwice,
            ),
            (DeliveryError::Timeout, RetryClass::MayRunTwice),
            (
                DeliveryError::TypeNotDeployed("probe".into()),
                RetryClass::SafeWithSameKey,
            ),
        ];
        for (error, class) in cases {
            assert_eq!(error.retry_class(), class, "{error:?}");
            assert_eq!(error.is_retryable(), class.is_retryable(), "{error:?}");
        }
    }

    #[test]
    fn every_transport_error_has_its_class() {
        let address = || "127.0.0.1:1".to_owned();
        let reason = || "why".to_owned();
        let cases = [
            (
                TransportError::Delivery(DeliveryError::Timeout),
                RetryClass::MayRunTwice,
            ),
            (
                TransportError::Delivery(DeliveryError::NotOwner(ShardId::new(1))),
                RetryClass::Safe,
            ),
            (
                TransportError::Unreachable {
                    address: address(),
                    reason: reason(),
                },
                RetryClass::Safe,
            ),
            (
                TransportError::Lost {
                    address: address(),
                    reason: reason(),
                },
                RetryClass::MayRunTwice,
            ),
            (
                TransportError::Protocol {
                    address: address(),
                    reason: reason(),
                },
                RetryClass::MayRunTwice,
            ),
            (TransportError::Unauthorized(address()), RetryClass::Never),
        ];
        for (error, class) in cases {
            assert_eq!(error.retry_class(), class, "{error:?}");
        }
    }

    #[test]
    fn every_client_error_has_its_class() {
        let timeout = Duration::from_secs(1);
        let cases = [
            (
                ClientError::Delivery(DeliveryError::BadMessage("x".into())),
                RetryClass::Never,
            ),
            (
                ClientError::Delivery(DeliveryError::MailboxFull("probe/x".into())),
                RetryClass::Safe,
            ),
            (ClientError::NoRunners, RetryClass::Safe),
            (
                ClientError::OwnerLost("gone".into()),
                RetryClass::MayRunTwice,
            ),
            (
                ClientError::Timeout {
                    timeout,
                    message_id: Some(MessageId::new(7)),
                },
                RetryClass::SafeWithSameKey,
            ),
            (
                ClientError::Timeout {
                    timeout,
                    message_id: None,
                },
                RetryClass::Safe,
            ),
            (
                ClientError::Storage(MessageStorageError::Unavailable("down".into())),
                RetryClass::SafeWithSameKey,
            ),
            (
                ClientError::Storage(MessageStorageError::Shutdown),
                RetryClass::SafeWithSameKey,
            ),
            (
                ClientError::Storage(MessageStorageError::IdTaken(MessageId::new(7))),
                RetryClass::Safe,
            ),
            (
                ClientError::Storage(MessageStorageError::Other("22P05".into())),
                RetryClass::Never,
            ),
            (
                ClientError::Storage(MessageStorageError::Unstorable {
                    field: "idempotency_key".into(),
                    problem: "holds NUL".into(),
                }),
                RetryClass::Never,
            ),
            (ClientError::Unauthorized, RetryClass::Never),
            (
                ClientError::SelfAsk(crate::ids::EntityAddress {
                    entity_type: crate::ids::EntityType::new("probe").expect("valid"),
                    entity_id: crate::ids::EntityId::new("a").expect("valid"),
                }),
                RetryClass::Never,
            ),
            (ClientError::NotConnected, RetryClass::Never),
            (ClientError::TooManyCalls(1024), RetryClass::Never),
            (
                ClientError::ErrorReply {
                    code: "overflow".into(),
                    message: "too big".into(),
                },
                RetryClass::Never,
            ),
            (
                ClientError::BadReply {
                    entity_type: crate::ids::EntityType::new("counter").expect("valid"),
                    problem: "missing field".into(),
                },
                RetryClass::Never,
            ),
            (
                ClientError::InvalidRequest("volatile".into()),
                RetryClass::Never,
            ),
        ];
        for (error, class) in cases {
            assert_eq!(error.retry_class(), class, "{error:?}");
            assert_eq!(error.is_retryable(), class.is_retryable(), "{error:?}");
        }
    }
}
