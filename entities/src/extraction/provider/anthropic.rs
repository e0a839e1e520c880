//! An Anthropic Messages client (`POST {base-url}/v1/messages`, headers `x-api-key` and
//! `anthropic-version: 2023-06-01`): the schema is the `input_schema` of one tool the
//! request forces (`tool_choice: {type: "tool", name}`), so the output is the `input` of
//! the answer's `tool_use` content block; tokens are `usage.input_tokens` /
//! `usage.output_tokens`. Errors are `{"type": "error", "error": {"type", "message"}}`;
//! 529 (`overloaded_error`) counts as unavailable.

use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::{
    Call, Provider, ProviderError, Reply, SYSTEM, Usage, output_schema, parse_output, prompt,
    status_error, transport_error,
};

/// The API version this client speaks.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
const TOOL: &str = "record_extraction";

/// An Anthropic Messages provider.
#[derive(Debug, Clone)]
pub struct Anthropic {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<String>,
    model: String,
    timeout: Duration,
}

impl Anthropic {
    /// A client of `base_url` (without `/v1`).
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

    async fn call_once(&self, call: &Call<'_>) -> Result<Reply, ProviderError> {
        let body = json!({
            "model": call.model,
            "max_tokens": call.max_tokens,
            "temperature": call.temperature,
            "system": SYSTEM,
            "messages": [{"role": "user", "content": prompt(call)}],
            "tools": [{
                "name": TOOL,
                "description": "Records the extraction.",
                "input_schema": output_schema(call),
            }],
            "tool_choice": {"type": "tool", "name": TOOL},
        });
        let mut request = self
            .http
            .post(format!("{}/v1/messages", self.base_url))
            .timeout(self.timeout)
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(&body);
        if let Some(key) = &self.api_key {
            request = request.header("x-api-key", key);
        }
        let response = request
            .send()
            .await
            .map_err(|e| transport_error(&e, self.timeout))?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response
            .text()
            .await
            .map_err(|e| transport_error(&e, self.timeout))?;
        if !status.is_success() {
            return Err(status_error(status, &headers, &text));
        }
        let reply: Value = serde_json::from_str(&text)
            .map_err(|e| ProviderError::InvalidOutput(format!("the response is not JSON: {e}")))?;
        let usage = Usage {
            input_tokens: reply["usage"]["input_tokens"].as_u64().unwrap_or(0),
            output_tokens: reply["usage"]["output_tokens"].as_u64().unwrap_or(0),
        };
        let input = reply["content"]
            .as_array()
            .and_then(|blocks| {
                blocks
                    .iter()
                    .find(|b| b["type"] == "tool_use" && b["name"] == TOOL)
            })
            .map(|block| block["input"].clone())
            .ok_or_else(|| ProviderError::InvalidOutput(format!("no `{TOOL}` tool_use block")))?;
        Ok(Reply {
            output: parse_output(call, &input)?,
            usage,
        })
    }
}

impl Provider for Anthropic {
    fn default_model(&self) -> &str {
        &self.model
    }

    fn call<'a>(&'a self, call: &'a Call<'a>) -> BoxFuture<'a, Result<Reply, ProviderError>> {
        Box::pin(self.call_once(call))
    }
}
