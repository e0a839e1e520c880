//! What the HTTP providers share: where a provider is, its key, its default model, the
//! call timeout, and one JSON exchange (a 2xx's body as JSON, or the error its status or
//! transport failure means).

use std::time::Duration;

use reqwest::RequestBuilder;
use serde_json::Value;

use super::{ProviderError, status_error, transport_error};

/// A remote provider's endpoint.
#[derive(Debug, Clone)]
pub struct HttpEndpoint {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<String>,
    model: String,
    timeout: Duration,
}

impl HttpEndpoint {
    /// `base_url` (without `/v1`; a trailing `/` is dropped), authenticating with `api_key`
    /// when given; each call bounded by `timeout`.
    pub fn new(
        http: reqwest::Client,
        base_url: &str,
        api_key: Option<String>,
        model: &str,
        timeout: Duration,
    ) -> Self {
        Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
            model: model.to_owned(),
            timeout,
        }
    }

    /// The model a request that names none gets.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// POSTs `body` to `path` (after the base URL); `headers` adds the API's own headers,
    /// given the key when there is one. The 2xx reply's body as JSON.
    pub(crate) async fn post_json(
        &self,
        path: &str,
        body: &Value,
        headers: impl FnOnce(RequestBuilder, Option<&str>) -> RequestBuilder,
    ) -> Result<Value, ProviderError> {
        let request = self
            .http
            .post(format!("{}{path}", self.base_url))
            .timeout(self.timeout)
            .json(body);
        let response = headers(request, self.api_key.as_deref())
            .send()
            .await
            .map_err(|e| transport_error(&e, self.timeout))?;
        let status = response.status();
        let response_headers = response.headers().clone();
        let text = response
            .text()
            .await
            .map_err(|e| transport_error(&e, self.timeout))?;
        if !status.is_success() {
            return Err(status_error(status, &response_headers, &text));
        }
        serde_json::from_str(&text)
            .map_err(|e| ProviderError::InvalidOutput(format!("the response is not JSON: {e}")))
    }
}
