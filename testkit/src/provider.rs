//! A fake language-model provider on a local port, speaking the real wire formats (shapes
//! recorded from the OpenAI chat-completions and Anthropic Messages APIs, usage and error
//! bodies included): `POST /v1/chat/completions` and `POST /v1/messages`.
//!
//! It answers from the JSON schema the request carries: a `mentions` schema gets
//! [`FakeProvider::MENTIONS`], a `relations` schema [`FakeProvider::RELATIONS`]. Tests
//! script failures ([`Behaviour`]: a status with its error body and `Retry-After`, or
//! output that is not JSON), hold one task's calls until released, add latency, and read
//! the call log ([`FakeProvider::calls`]) and the most calls ever in flight at once.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::watch;

/// How the fake answers one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// A valid answer.
    Ok,
    /// An error status with the API's error body, and `Retry-After` seconds if given.
    Status {
        /// 429, 500, 529, 400, …
        status: u16,
        /// `Retry-After`.
        retry_after: Option<u64>,
    },
    /// 200 with output that is not the schema's JSON.
    InvalidOutput,
}

/// One call the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    /// `openai` or `anthropic`.
    pub api: &'static str,
    /// `mentions` or `relations` (from the request's schema).
    pub task: String,
    /// The model asked for.
    pub model: String,
    /// When it arrived, ms since the Unix epoch.
    pub at_ms: u64,
    /// The status answered.
    pub status: u16,
}

#[derive(Debug)]
struct Shared {
    calls: Mutex<Vec<CallRecord>>,
    script: Mutex<VecDeque<Behaviour>>,
    default: Mutex<Behaviour>,
    latency: Mutex<Duration>,
    held: Mutex<Option<String>>,
    release: watch::Sender<u64>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// The fake provider; stops when dropped.
#[derive(Debug)]
pub struct FakeProvider {
    /// Its address.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeProvider {
    /// What a `mentions` call answers.
    pub const MENTIONS: &'static str = r#"[{"text":"Ada Lovelace","type":"foaf:Person"},{"text":"Analytical Society","type":"foaf:Organization"},{"text":"Charles Babbage","type":"foaf:Person"}]"#;
    /// What a `relations` call answers.
    pub const RELATIONS: &'static str = r#"[{"subject":"Ada Lovelace","predicate":"shoal:memberOf","object":"Analytical Society"},{"subject":"Ada Lovelace","predicate":"foaf:knows","object":"Charles Babbage"}]"#;

    /// Starts it on a free port.
    pub async fn start() -> anyhow::Result<Self> {
        let (release, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            calls: Mutex::new(Vec::new()),
            script: Mutex::new(VecDeque::new()),
            default: Mutex::new(Behaviour::Ok),
            latency: Mutex::new(Duration::ZERO),
            held: Mutex::new(None),
            release,
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(openai))
            .route("/v1/messages", post(anthropic))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// `http://127.0.0.1:<port>` (the providers' `base-url`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next calls answer these, in order (then the default).
    pub fn script(&self, behaviours: impl IntoIterator<Item = Behaviour>) {
        lock(&self.shared.script).extend(behaviours);
    }

    /// What calls answer when the script is empty.
    pub fn set_default(&self, behaviour: Behaviour) {
        *lock(&self.shared.default) = behaviour;
    }

    /// Every call waits this long before answering.
    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.shared.latency) = latency;
    }

    /// Calls of `task` wait (after being logged) until [`Self::release`].
    pub fn hold(&self, task: &str) {
        *lock(&self.shared.held) = Some(task.to_owned());
    }

    /// Lets held calls (and later ones) through.
    pub fn release(&self) {
        *lock(&self.shared.held) = None;
        self.shared.release.send_modify(|n| *n += 1);
    }

    /// Every call so far, in order of arrival.
    pub fn calls(&self) -> Vec<CallRecord> {
        lock(&self.shared.calls).clone()
    }

    /// Calls of `task` so far.
    pub fn calls_of(&self, task: &str) -> usize {
        self.calls().iter().filter(|c| c.task == task).count()
    }

    /// The most calls that were in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `mentions` or `relations`: the one required property of the output schema.
fn task_of(schema: &Value) -> String {
    schema["required"][0]
        .as_str()
        .unwrap_or("unknown")
        .to_owned()
}

fn answer_for(task: &str) -> Value {
    let list = match task {
        "mentions" => FakeProvider::MENTIONS,
        _ => FakeProvider::RELATIONS,
    };
    json!({ task: serde_json::from_str::<Value>(list).unwrap_or(Value::Null) })
}

/// Logs the call, waits (latency, hold), and picks its behaviour.
async fn arrive(shared: &Shared, api: &'static str, task: &str, model: &str) -> Behaviour {
    let in_flight = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    shared.max_in_flight.fetch_max(in_flight, Ordering::SeqCst);
    let behaviour = lock(&shared.script)
        .pop_front()
        .unwrap_or_else(|| lock(&shared.default).clone());
    let status = match &behaviour {
        Behaviour::Status { status, .. } => *status,
        _ => 200,
    };
    lock(&shared.calls).push(CallRecord {
        api,
        task: task.to_owned(),
        model: model.to_owned(),
        at_ms: now_ms(),
        status,
    });
    let latency = *lock(&shared.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mut release = shared.release.subscribe();
    while lock(&shared.held).as_deref() == Some(task) {
        if release.changed().await.is_err() {
            break;
        }
    }
    shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    behaviour
}

fn with_retry_after(status: u16, retry_after: Option<u64>, body: Value) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (code, axum::Json(body)).into_response();
    if let Some(seconds) = retry_after
        && let Ok(value) = seconds.to_string().parse()
    {
        response.headers_mut().insert("retry-after", value);
    }
    response
}

async fn openai(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::Json<Value>,
) -> Response {
    let request = body.0;
    if !headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer "))
    {
        return with_retry_after(
            401,
            None,
            json!({"error": {
            "message": "You didn't provide an API key.", "type": "invalid_request_error",
            "param": null, "code": null}}),
        );
    }
    let task = task_of(&request["response_format"]["json_schema"]["schema"]);
    let model = request["model"].as_str().unwrap_or("").to_owned();
    match arrive(&shared, "openai", &task, &model).await {
        Behaviour::Status {
            status,
            retry_after,
        } => {
            let error = match status {
                429 => {
                    json!({"message": format!("Rate limit reached for {model} in organization org-fake on requests per min (RPM): Limit 3, Used 3, Requested 1."),
                    "type": "requests", "param": null, "code": "rate_limit_exceeded"})
                }
                500..=599 => {
                    json!({"message": "The server had an error while processing your request. Sorry about that!",
                    "type": "server_error", "param": null, "code": null})
                }
                _ => {
                    json!({"message": "Invalid request.", "type": "invalid_request_error", "param": null, "code": null})
                }
            };
            with_retry_after(status, retry_after, json!({"error": error}))
        }
        behaviour => {
            let content = if behaviour == Behaviour::InvalidOutput {
                "Sure! Here are the entities I found: Ada Lovelace (a person).".to_owned()
            } else {
                answer_for(&task).to_string()
            };
            let prompt_tokens = request.to_string().len() as u64 / 4;
            let completion_tokens = content.len() as u64 / 4;
            axum::Json(json!({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": now_ms() / 1000,
                "model": model, "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": null},
                    "logprobs": null, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens},
            }))
            .into_response()
        }
    }
}

async fn anthropic(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::Json<Value>,
) -> Response {
    let request = body.0;
    let error = |status: u16, kind: &str, message: &str, retry_after| {
        with_retry_after(
            status,
            retry_after,
            json!({"type": "error", "error": {"type": kind, "message": message}}),
        )
    };
    if headers.get("x-api-key").is_none() {
        return error(
            401,
            "authentication_error",
            "x-api-key header is required",
            None,
        );
    }
    if headers.get("anthropic-version").is_none() {
        return error(
            400,
            "invalid_request_error",
            "anthropic-version header is required",
            None,
        );
    }
    let tool = &request["tools"][0];
    let task = task_of(&tool["input_schema"]);
    let model = request["model"].as_str().unwrap_or("").to_owned();
    match arrive(&shared, "anthropic", &task, &model).await {
        Behaviour::Status {
            status,
            retry_after,
        } => match status {
            429 => error(
                429,
                "rate_limit_error",
                "Number of request tokens has exceeded your per-minute rate limit",
                retry_after,
            ),
            529 => error(529, "overloaded_error", "Overloaded", retry_after),
            500..=599 => error(status, "api_error", "Internal server error", retry_after),
            _ => error(
                status,
                "invalid_request_error",
                "Invalid request",
                retry_after,
            ),
        },
        behaviour => {
            let content = if behaviour == Behaviour::InvalidOutput {
                json!([{"type": "text", "text": "I found Ada Lovelace, a person."}])
            } else {
                json!([{"type": "tool_use", "id": "toolu_fake", "name": tool["name"], "input": answer_for(&task)}])
            };
            let input_tokens = request.to_string().len() as u64 / 4;
            axum::Json(json!({
                "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                "content": content, "stop_reason": "tool_use", "stop_sequence": null,
                "usage": {"input_tokens": input_tokens, "output_tokens": 40},
            }))
            .into_response()
        }
    }
}
