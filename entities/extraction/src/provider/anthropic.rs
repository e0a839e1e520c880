//! An Anthropic Messages client (`POST {base-url}/v1/messages`, headers `x-api-key` and
//! `anthropic-version: 2023-06-01`): the schema is the `input_schema` of one tool the
//! request forces (`tool_choice: {type: "tool", name}`), so the output is the `input` of
//! the answer's `tool_use` content block; tokens are `usage.input_tokens` /
//! `usage.output_tokens`. Errors are `{"type": "error", "error": {"type", "message"}}`;
//! 529 (`overloaded_error`) counts as unavailable.

use futures::future::BoxFuture;
use serde_json::json;

use super::http::HttpEndpoint;
use super::{
    Call, Provider, ProviderError, Reply, SYSTEM, Usage, output_schema, parse_output, prompt,
};

/// The API version this client speaks.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
const TOOL: &str = "record_extraction";

/// An Anthropic Messages provider.
#[derive(Debug, Clone)]
pub struct Anthropic {
    endpoint: HttpEndpoint,
}

impl Anthropic {
    /// A client of `endpoint`, sending its key as `x-api-key` when it has one.
    pub fn new(endpoint: HttpEndpoint) -> Self {
        Self { endpoint }
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
        let reply = self
            .endpoint
            .post_json("/v1/messages", &body, |request, key| {
                let request = request.header("anthropic-version", ANTHROPIC_VERSION);
                match key {
                    Some(key) => request.header("x-api-key", key),
                    None => request,
                }
            })
            .await?;
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
        self.endpoint.model()
    }

    fn call<'a>(&'a self, call: &'a Call<'a>) -> BoxFuture<'a, Result<Reply, ProviderError>> {
        Box::pin(self.call_once(call))
    }
}
