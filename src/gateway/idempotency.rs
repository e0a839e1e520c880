//! The one rule for a caller's idempotency key, on every route that takes one (the generic
//! entity route, `POST /tenants/{t}/events`, `POST /jobs` as header or body field): 1 to
//! [`IdempotencyKey::MAX_CHARS`] characters, none a control character (so no NUL, which
//! storage cannot hold, and no tab or newline). The OpenAPI document declares the same
//! bounds and [`IdempotencyKey::PATTERN`].
//!
//! Each route keeps its keys in a space of its own ([`IdempotencyKey::in_space`]), so a
//! key used on one route never answers another route's stored reply, even where both reach
//! the same entity.

use axum::http::HeaderMap;

use super::ApiError;

/// A caller's idempotency key, checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

/// The error code of a key that breaks the rule.
const CODE: &str = "bad_idempotency_key";

impl IdempotencyKey {
    /// At most this many characters.
    pub const MAX_CHARS: usize = 255;
    /// The characters a key may hold, as an OpenAPI (ECMA-262 and Python `re`) pattern:
    /// anything but the C0 and C1 control characters and DEL.
    pub const PATTERN: &'static str = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$";
    /// The same in the `Idempotency-Key` header, which carries visible ASCII and spaces
    /// (HTTP drops a value's leading and trailing spaces).
    pub const HEADER_PATTERN: &'static str = "^[!-~]([ -~]*[!-~])?$";
    /// The request header that carries a key.
    pub const HEADER: &'static str = "idempotency-key";

    /// Checks `key`; `field` names where it came from in the error (`header
    /// \`Idempotency-Key\``, `field \`key\``).
    pub fn parse(key: &str, field: &str) -> Result<Self, ApiError> {
        let chars = key.chars().count();
        if chars == 0 || chars > Self::MAX_CHARS {
            return Err(ApiError::bad_request(
                CODE,
                format!("{field}: 1 to {} characters, got {chars}", Self::MAX_CHARS),
            ));
        }
        if let Some(at) = key.chars().position(char::is_control) {
            return Err(ApiError::bad_request(
                CODE,
                format!("{field}: a control character at character {at}; keys are printable"),
            ));
        }
        Ok(Self(key.to_owned()))
    }

    /// The `Idempotency-Key` header's key, if the request has one.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, ApiError> {
        let Some(value) = headers.get(Self::HEADER) else {
            return Ok(None);
        };
        let text = value.to_str().map_err(|_| {
            ApiError::bad_request(CODE, "header `Idempotency-Key`: not visible ASCII text")
        })?;
        Self::parse(text, "header `Idempotency-Key`").map(Some)
    }

    /// The key as the caller gave it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key as stored by route `space` (e.g. `events`): `<space>/<key>`.
    pub fn in_space(&self, space: &str) -> String {
        format!("{space}/{}", self.0)
    }

    /// The key itself, for a route whose keys already have a space of their own.
    pub fn into_inner(self) -> String {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn code(error: ApiError) -> String {
        match error {
            ApiError::BadRequest { code, .. } => code.to_string(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn one_to_255_printable_characters() {
        assert!(IdempotencyKey::parse("k", "key").is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(255), "key").is_ok());
        assert!(IdempotencyKey::parse(&"é".repeat(255), "key").is_ok());
        for bad in [
            String::new(),
            "k".repeat(256),
            "a\0b".into(),
            "a\tb".into(),
            "a\u{85}b".into(),
        ] {
            let error = IdempotencyKey::parse(&bad, "key").expect_err(&bad);
            assert_eq!(code(error), CODE, "{bad:?}");
        }
    }

    #[test]
    fn an_empty_header_is_refused_not_ignored() {
        let mut headers = HeaderMap::new();
        assert_eq!(IdempotencyKey::from_headers(&headers).ok(), Some(None));
        headers.insert("idempotency-key", HeaderValue::from_static(""));
        assert!(IdempotencyKey::from_headers(&headers).is_err());
    }
}
