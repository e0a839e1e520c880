//! The gateway's one error type. Every error leaves as
//! `{"error": {"code", "message", "retryable"}}` with its status; internals are logged once
//! and never shown.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::client::ClientError;
use crate::entity_runtime::DeliveryError;
use crate::message_storage::MessageStorageError;

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
    },
    /// The deadline passed (504). A persisted message still runs.
    #[error("{message}")]
    Timeout {
        /// What timed out.
        message: String,
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
}

impl ApiError {
    /// A 400 with a code and message.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
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
            | Self::TooManyRequests { code, .. }
            | Self::Unavailable { code, .. } => code,
            Self::HandlerError { code, .. } => code,
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::Timeout { .. } => "timeout",
            Self::Internal(_) => "internal",
        }
    }

    fn retryable(&self) -> bool {
        matches!(
            self,
            Self::TooManyRequests { .. } | Self::Unavailable { .. } | Self::Timeout { .. }
        )
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
                retryable: self.retryable(),
            },
        };
        let mut response = (status, Json(body)).into_response();
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
        match error {
            ClientError::Delivery(delivery) => delivery.into(),
            ClientError::NoRunners => Self::Unavailable {
                code: "no_runners",
                message: "no runner is alive".to_owned(),
            },
            ClientError::OwnerLost(message) => Self::Unavailable {
                code: "owner_lost",
                message: format!(
                    "the entity's runner was lost mid-request; it may not have run: {message}"
                ),
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
            },
            // What storage cannot hold is the request's own fault, and names its field.
            ClientError::Storage(error @ MessageStorageError::Unstorable { .. }) => {
                Self::bad_request("unstorable", error.to_string())
            }
            ClientError::Storage(error) if error.is_retryable() => Self::Unavailable {
                code: "storage_unavailable",
                message: error.to_string(),
            },
            ClientError::Storage(error) => Self::Internal(error.to_string()),
            ClientError::Unauthorized => {
                Self::Internal("a runner refused the gateway's cluster secret".to_owned())
            }
        }
    }
}

impl From<DeliveryError> for ApiError {
    fn from(error: DeliveryError) -> Self {
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
            DeliveryError::BadMessage(message) => Self::bad_request("bad_message", message),
            DeliveryError::Timeout => Self::Timeout {
                message: "the runner did not answer in time".to_owned(),
            },
            other => Self::Unavailable {
                code: "unavailable",
                message: other.to_string(),
            },
        }
    }
}
