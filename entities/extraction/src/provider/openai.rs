//! An OpenAI-compatible chat-completions client (`POST {base-url}/v1/chat/completions`):
//! the schema goes in `response_format: {type: "json_schema", json_schema: {name, strict,
//! schema}}`, the output comes back as the JSON text of `choices[0].message.content`, the
//! tokens in `usage.prompt_tokens`/`usage.completion_tokens`. Errors are
//! `{"error": {"message", "type", "code"}}` with the HTTP status.

use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::http::HttpEndpoint;
use super::{
    Call, Provider, ProviderError, Reply, SYSTEM, Usage, output_schema, parse_output, prompt,
};

/// An OpenAI-compatible provider.
#[derive(Debug, Clone)]
pub struct OpenAi {
    endpoint: HttpEndpoint,
}

impl OpenAi {
    /// A client of `endpoint`, authenticating with a bearer token when it has a key.
    pub fn new(endpoint: HttpEndpoint) -> Self {
        Self { endpoint }
    }

    async fn call_once(&self, call: &Call<'_>) -> Result<Reply, ProviderError> {
        let body = json!({
            "model": call.model,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": prompt(call)},
            ],
            "temperature": call.temperature,
            "max_tokens": call.max_tokens,
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "extraction", "strict": true, "schema": output_schema(call),
            }},
        });
        let reply = self
            .endpoint
            .post_json("/v1/chat/completions", &body, |request, key| match key {
                Some(key) => request.bearer_auth(key),
                None => request,
            })
            .await?;
        let usage = Usage {
            input_tokens: reply["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
            output_tokens: reply["usage"]["completion_tokens"].as_u64().unwrap_or(0),
        };
        let content = reply["choices"][0]["message"]["content"]
            .as_str()
            .ok_or_else(|| {
                ProviderError::InvalidOutput("no `choices[0].message.content`".into())
            })?;
        let value: Value = serde_json::from_str(content)
            .map_err(|e| ProviderError::InvalidOutput(format!("the content is not JSON: {e}")))?;
        Ok(Reply {
            output: parse_output(call, &value)?,
            usage,
        })
    }
}

impl Provider for OpenAi {
    fn default_model(&self) -> &str {
        self.endpoint.model()
    }

    fn call<'a>(&'a self, call: &'a Call<'a>) -> BoxFuture<'a, Result<Reply, ProviderError>> {
        Box::pin(self.call_once(call))
    }
}
