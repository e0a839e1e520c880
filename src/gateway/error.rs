//! The gateway's one error type. Every error leaves as
//! `{"error": {"code", "message", "retryable", "retry"}}` with its status; internals are
//! logged once and never shown.
//!
//! `retry` is the error's [`RetryClass`] (`safe`, `safe_with_same_key`, `may_run_twice`,
//! `never`) and `retryable` is derived from it (everything but `never`). Where the class
//! depends on what happened (a 503 or 504 may or may not have run the work) the variant
//! carries it, taken from the client's error; the table is in the README.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::client::ClientError;
use crate::message_storage::MessageStorageError;
use crate::retry::RetryClass;
use crate::transport::DeliveryError;

/// An error answered to an HTTP client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed (400).
    #[error("{message}")]
    BadRequest {
        /// Machine-readable code.
        code: &'static str,
        /// What is wrong, naming the field.
        message: String,
    },
    /// No such thing (404).
    #[error("{message}")]
    NotFound {
        /// Machine-readable code.
        code: &'static str,
        /// What was not found.
        message: String,
    },
    /// No valid credentials (401, `WWW-Authenticate: Bearer`).
    #[error("{message}")]
    Unauthorized {
        /// Machine-readable code.
        code: &'static str,
        /// What is missing or wrong.
        message: String,
    },
    /// The credentials do not allow this (403).
    #[error("{message}")]
    Forbidden {
        /// Machine-readable code.
        code: &'static str,
        /// What is not allowed.
        message: String,
    },
    /// The route exists but not for this method (405).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The body is over the limit (413).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The handler answered with an error (422): final, not retryable.
    #[error("{message}")]
    HandlerError {
        /// The handler's code.
        code: String,
        /// The handler's message.
        message: String,
    },
    /// Too many requests for the entity (429).
    #[error("{message}")]
    TooManyRequests {
        /// Machine-readable code.
        code: &'static str,
        /// What is full.
        message: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// A dependency or the owner is unavailable (503); retrying may succeed.
    #[error("{message}")]
    Unavailable {
        /// Machine-readable code.
        code: &'static str,
        /// What is unavailable.
        message: String,
        /// What a resend can do (whether the work may have run or is stored).
        retry: RetryClass,
    },
    /// The deadline passed (504). A persisted message still runs.
    #[error("{message}")]
    Timeout {
        /// What timed out.
        message: String,
        /// What a resend can do (a stored message, a volatile one that may have run, or
        /// nothing reached a handler).
        retry: RetryClass,
    },
    /// Something that should not happen (500); details only in the log.
    #[error("internal error")]
    Internal(String),
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    code: &'a str,
    message: String,
    retryable: bool,
    retry: RetryClass,
}

impl ApiError {
    /// A 422: the request fits the OpenAPI document, but a rule the document cannot state
    /// (one that depends on state, or on more than one field) refuses it.
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::HandlerError {
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// A 400: what the OpenAPI document forbids (`code` names the kind, `message` the
    /// field).
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// A 400 for a path segment `name` that does not parse: code `bad_id`, the message
    /// naming the segment and why.
    pub fn bad_path_id(name: &str, why: impl std::fmt::Display) -> Self {
        Self::bad_request("bad_id", format!("path `{name}`: {why}"))
    }

    /// A 404 for a `what` (job, extraction, …) that does not exist: code `code` (by the
    /// gateway's convention `unknown_<what>`), message ``no <what> `<id>` ``.
    pub fn unknown(code: &'static str, what: &str, id: impl std::fmt::Display) -> Self {
        Self::NotFound {
            code,
            message: format!("no {what} `{id}`"),
        }
    }

    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HandlerError { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &str {
        match self {
            Self::BadRequest { code, .. }
            | Self::NotFound { code, .. }
            | Self::Unauthorized { code, .. }
            | Self::Forbidden { code, .. }
            | Self::TooManyRequests { code, .. }
            | Self::Unavailable { code, .. } => code,
            Self::HandlerError { code, .. } => code,
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::Timeout { .. } => "timeout",
            Self::Internal(_) => "internal",
        }
    }

    /// What a resend of the request can do.
    pub fn retry_class(&self) -> RetryClass {
        match self {
            Self::BadRequest { .. }
            | Self::NotFound { .. }
            | Self::Unauthorized { .. }
            | Self::Forbidden { .. }
            | Self::MethodNotAllowed
            | Self::PayloadTooLarge(_)
            | Self::HandlerError { .. }
            | Self::Internal(_) => RetryClass::Never,
            // Refused before anything was admitted (mailbox, resident cap, rate limit).
            Self::TooManyRequests { .. } => RetryClass::Safe,
            Self::Unavailable { retry, .. } | Self::Timeout { retry, .. } => *retry,
        }
    }

    /// The error as answered to a caller who sent no idempotency key: a stored message
    /// it cannot name again may run twice if resent (see [`RetryClass::without_key`]).
    pub fn without_key(mut self) -> Self {
        if let Self::Unavailable { retry, .. } | Self::Timeout { retry, .. } = &mut self {
            *retry = retry.without_key();
        }
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let Self::Internal(detail) = &self {
            tracing::error!(%detail, "internal error answered with 500");
        } else if status.is_server_error() {
            tracing::warn!(error = %self, %status, "request failed");
        }
        let body = Body {
            error: Detail {
                code: self.code(),
                message: self.to_string(),
                retryable: self.retry_class().is_retryable(),
                retry: self.retry_class(),
            },
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        let retry_after = match &self {
            Self::TooManyRequests { retry_after, .. } => Some(retry_after.as_secs().max(1)),
            Self::Unavailable { .. } => Some(1),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<ClientError> for ApiError {
    fn from(error: ClientError) -> Self {
        let retry = error.retry_class();
        match error {
            ClientError::Delivery(delivery) => delivery.into(),
            ClientError::NoRunners => Self::Unavailable {
                code: "no_runners",
                message: "no runner is alive".to_owned(),
                retry,
            },
            ClientError::OwnerLost(message) => Self::Unavailable {
                code: "owner_lost",
                message: format!(
                    "the entity's runner was lost mid-request; it may or may not have run: {message}"
                ),
                retry,
            },
            ClientError::Timeout {
                timeout,
                message_id,
            } => Self::Timeout {
                message: match message_id {
                    Some(id) => format!(
                        "no reply within {timeout:?}; persisted message {id} is stored and will run"
                    ),
                    None => format!("no reply within {timeout:?}"),
                },
                retry,
            },
            // What storage cannot hold is the request's own fault, and names its field.
            ClientError::Storage(error @ MessageStorageError::Unstorable { .. }) => {
                Self::bad_request("unstorable", error.to_string())
            }
            ClientError::Storage(error @ MessageStorageError::Shutdown) => Self::Unavailable {
                code: "shutting_down",
                message: error.to_string(),
                retry,
            },
            ClientError::Storage(error) if retry.is_retryable() => Self::Unavailable {
                code: "storage_unavailable",
                message: error.to_string(),
                retry,
            },
            ClientError::Storage(error) => Self::Internal(error.to_string()),
            ClientError::Unauthorized => {
                Self::Internal("a runner refused the gateway's cluster secret".to_owned())
            }
            // Only a handler's calls through its context meet these.
            error @ (ClientError::SelfAsk(_)
            | ClientError::NotConnected
            | ClientError::TooManyCalls(_)) => Self::Internal(error.to_string()),
            // Routes built on the typed client meet these; an error reply is answered as the
            // untyped route answers `Reply::Err` (422).
            ClientError::InvalidRequest(message) => Self::bad_request("invalid_request", message),
            ClientError::ErrorReply { code, message } => Self::HandlerError { code, message },
            ClientError::BadReply {
                entity_type,
                problem,
            } => Self::Internal(format!(
                "the reply of `{entity_type}` does not decode: {problem}"
            )),
        }
    }
}

impl From<DeliveryError> for ApiError {
    fn from(error: DeliveryError) -> Self {
        let retry = error.retry_class();
        match error {
            DeliveryError::MailboxFull(entity) => Self::TooManyRequests {
                code: "mailbox_full",
                message: format!("the mailbox of {entity} is full"),
                retry_after: Duration::from_secs(1),
            },
            DeliveryError::Overloaded => Self::TooManyRequests {
                code: "overloaded",
                message: "the entity's runner hosts as many entities as it may".to_owned(),
                retry_after: Duration::from_secs(1),
            },
            DeliveryError::UnknownEntityType(t) => Self::NotFound {
                code: "unknown_entity_type",
                message: format!("no entity type `{t}`"),
            },
            DeliveryError::TypeNotDeployed(_) => Self::Unavailable {
                code: "type_not_deployed",
                message: error.to_string(),
                retry,
            },
            DeliveryError::BadMessage(message) => Self::bad_request("bad_message", message),
            DeliveryError::Timeout => Self::Timeout {
                message: "the runner did not answer in time; the message may still run".to_owned(),
                retry,
            },
            other @ (DeliveryError::NotOwner(_)
            | DeliveryError::ShardMoving(_)
            | DeliveryError::HandlerFailed(_)) => Self::Unavailable {
                code: "unavailable",
                message: other.to_string(),
                retry,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{MessageId, ShardId};

    async fn body_of(error: ApiError) -> (StatusCode, serde_json::Value) {
        let response = error.into_response();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("the body is read");
        (
            status,
            serde_json::from_slice(&bytes).expect("the body is JSON"),
        )
    }

    /// Every client error the gateway can meet, with the status and class it answers.
    fn client_cases() -> Vec<(ClientError, StatusCode, RetryClass)> {
        let shard = ShardId::new(2);
        let timeout = Duration::from_millis(300);
        vec![
            (
                DeliveryError::NotOwner(shard).into(),
                StatusCode::SERVICE_UNAVAILABLE,
                RetryClass::Safe,
            ),
            (
                DeliveryError::ShardMoving(shard).into(),
                StatusCode::SERVICE_UNAVAILABLE,
                RetryClass::Safe,
            ),
            (
                DeliveryError::MailboxFull("probe/x".into()).into(),
                StatusCode::TOO_MANY_REQUESTS,
                RetryClass::Safe,
            ),
            (
                DeliveryError::Overloaded.into(),
                StatusCode::TOO_MANY_REQUESTS,
                RetryClass::Safe,
            ),
            (
                DeliveryError::UnknownEntityType("nobody".into()).into(),
                StatusCode::NOT_FOUND,
                RetryClass::Never,
            ),
            (
                DeliveryError::BadMessage("no field `by`".into()).into(),
                StatusCode::BAD_REQUEST,
                RetryClass::Never,
            ),
            (
                DeliveryError::HandlerFailed("panicked".into()).into(),
                StatusCode::SERVICE_UNAVAILABLE,
                RetryClass::MayRunTwice,
            ),
            (
                DeliveryError::Timeout.into(),
                StatusCode::GATEWAY_TIMEOUT,
                RetryClass::MayRunTwice,
            ),
            (
                ClientError::NoRunners,
                StatusCode::SERVICE_UNAVAILABLE,
                RetryClass::Safe,
            ),
            (
                ClientError::OwnerLost("connection reset".into()),
                StatusCode::SERVICE_UNAVAILABLE,
                RetryClass::MayRunTwice,
            ),
            (
                ClientError::Timeout {
                    timeout,
                    message_id: Some(MessageId::new(9)),
                },
                StatusCode::GATEWAY_TIMEOUT,
                RetryClass::SafeWithSameKey,
            ),
            (
                ClientError::Timeout {
                    timeout,
                    message_id: None,
                },
                StatusCode::GATEWAY_TIMEOUT,
                RetryClass::Safe,
            ),
            (
                MessageStorageError::Unavailable("down".into()).into(),
                StatusCode::SERVICE_UNAVAILABLE,
                RetryClass::SafeWithSameKey,
            ),
            (
                MessageStorageError::Shutdown.into(),
                StatusCode::SERVICE_UNAVAILABLE,
                RetryClass::SafeWithSameKey,
            ),
            (
                MessageStorageError::IdTaken(MessageId::new(9)).into(),
                StatusCode::SERVICE_UNAVAILABLE,
                RetryClass::Safe,
            ),
            (
                MessageStorageError::Other("boom".into()).into(),
                StatusCode::INTERNAL_SERVER_ERROR,
                RetryClass::Never,
            ),
            (
                MessageStorageError::Unstorable {
                    field: "payload/a".into(),
                    problem: "holds NUL".into(),
                }
                .into(),
                StatusCode::BAD_REQUEST,
                RetryClass::Never,
            ),
            (
                ClientError::Unauthorized,
                StatusCode::INTERNAL_SERVER_ERROR,
                RetryClass::Never,
            ),
            (
                ClientError::ErrorReply {
                    code: "overflow".into(),
                    message: "too big".into(),
                },
                StatusCode::UNPROCESSABLE_ENTITY,
                RetryClass::Never,
            ),
            (
                ClientError::InvalidRequest("a volatile message with a delivery time".into()),
                StatusCode::BAD_REQUEST,
                RetryClass::Never,
            ),
        ]
    }

    #[tokio::test]
    async fn every_client_error_answers_its_status_and_class() {
        for (error, status, class) in client_cases() {
            let shown = format!("{error:?}");
            assert_eq!(error.retry_class(), class, "{shown}: the client's class");
            let api = ApiError::from(error);
            assert_eq!(api.retry_class(), class, "{shown}");
            let (answered, body) = body_of(api).await;
            assert_eq!(answered, status, "{shown}");
            assert_eq!(body["error"]["retry"], class.as_str(), "{shown}: {body}");
            assert_eq!(
                body["error"]["retryable"],
                class.is_retryable(),
                "{shown}: {body}"
            );
        }
    }

    #[tokio::test]
    async fn gateway_errors_answer_their_status_and_class() {
        let cases = [
            (
                ApiError::bad_request("bad_body", "no"),
                StatusCode::BAD_REQUEST,
                RetryClass::Never,
            ),
            (
                ApiError::NotFound {
                    code: "no_route",
                    message: "no".into(),
                },
                StatusCode::NOT_FOUND,
                RetryClass::Never,
            ),
            (
                ApiError::MethodNotAllowed,
                StatusCode::METHOD_NOT_ALLOWED,
                RetryClass::Never,
            ),
            (
                ApiError::PayloadTooLarge("big".into()),
                StatusCode::PAYLOAD_TOO_LARGE,
                RetryClass::Never,
            ),
            (
                ApiError::HandlerError {
                    code: "too_many_attempts".into(),
                    message: "no".into(),
                },
                StatusCode::UNPROCESSABLE_ENTITY,
                RetryClass::Never,
            ),
            (
                ApiError::TooManyRequests {
                    code: "rate_limited",
                    message: "slow down".into(),
                    retry_after: Duration::from_secs(2),
                },
                StatusCode::TOO_MANY_REQUESTS,
                RetryClass::Safe,
            ),
            (
                ApiError::Internal("detail".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                RetryClass::Never,
            ),
        ];
        for (error, status, class) in cases {
            let shown = format!("{error:?}");
            let (answered, body) = body_of(error).await;
            assert_eq!(answered, status, "{shown}");
            assert_eq!(body["error"]["retry"], class.as_str(), "{shown}: {body}");
            assert_eq!(body["error"]["retryable"], class.is_retryable(), "{shown}");
        }
    }

    #[test]
    fn without_a_key_only_a_stored_message_changes_class() {
        let stored = ApiError::from(ClientError::Timeout {
            timeout: Duration::from_secs(1),
            message_id: Some(MessageId::new(1)),
        });
        assert_eq!(stored.without_key().retry_class(), RetryClass::MayRunTwice);
        for (error, _, class) in client_cases() {
            if class != RetryClass::SafeWithSameKey {
                let api = ApiError::from(error);
                assert_eq!(api.without_key().retry_class(), class);
            }
        }
    }
}
