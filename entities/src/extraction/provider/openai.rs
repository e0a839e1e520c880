//! An OpenAI-compatible chat-completions client (`POST {base-url}/v1/chat/completions`):
//! the schema goes in `response_format: {type: "json_schema", json_schema: {name, strict,
//! schema}}`, the output comes back as the JSON text of `choices[0].message.content`, the
//! tokens in `usage.prompt_tokens`/`usage.completion_tokens`. Errors are
//! `{"error": {"message", "type", "code"}}` with the HTTP status.

use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::{
    Call, Provider, ProviderError, Reply, SYSTEM, Usage, output_schema, parse_output, prompt,
    status_error, transport_error,
};

/// An OpenAI-compatible provider.
#[derive(Debug, Clone)]
pub struct OpenAi {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<String>,
    model: String,
    timeout: Duration,
}

impl OpenAi {
    /// A client of `base_url` (without `/v1`), authenticating with `api_key` when given.
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
        let mut request = self
            .http
            .post(format!("{}/v1/chat/completions", self.base_url))
            .timeout(self.timeout)
            .json(&body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
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
        &self.model
    }

    fn call<'a>(&'a self, call: &'a Call<'a>) -> BoxFuture<'a, Result<Reply, ProviderError>> {
        Box::pin(self.call_once(call))
    }
}
