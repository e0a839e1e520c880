//! The OpenAPI document and the server held together, against a real `shoal gateway`
//! process and a real cluster: for every path and method of `/openapi.json`, a request is
//! built from the document's own schemas (path parameters checked against their declared
//! patterns, the body generated from the request schema), sent, and the answer's status,
//! content type and body are checked against the document's response for that status with
//! an independent JSON-Schema validator (the `jsonschema` crate, draft 2020-12 as OpenAPI
//! 3.1 uses). Every other method of a documented path must be refused (405), an undocumented
//! path must be 404, so the server serves nothing the document does not list. The document
//! itself must parse as OpenAPI 3.1 (`oas3`).

mod common;

use anyhow::{Context, bail, ensure};
use common::TestCluster;
use common::gateway::{Gateway, GatewayOptions, Http, HttpResponse};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const SHARDS: u32 = 4;
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// What the document says of one operation.
struct Operation<'a> {
    method: &'a str,
    path: &'a str,
    spec: &'a Value,
}

/// A value for a path parameter, by name (the generic routes get a registered type and
/// message, so they answer 200 as the typed ones do).
fn parameter_value(path: &str, name: &str, serial: usize) -> anyhow::Result<String> {
    Ok(match name {
        // An extraction id (no such extraction: its documented 404).
        "id" if path.starts_with("/extractions/") => {
            format!("ex-{}", uuid::Uuid::now_v7().simple())
        }
        "entity_type" => "counter".to_owned(),
        "message" => "get".to_owned(),
        "entity_id" => format!("contract-{serial}"),
        // A job id (no such job: the job routes answer their documented 404).
        "id" => uuid::Uuid::now_v7().to_string(),
        "tenant" => format!("contract-tenant-{serial}"),
        other => bail!("no value for path parameter `{other}`"),
    })
}

/// `schema` with the document's components beside it, so `#/components/...` resolves.
fn rooted(schema: &Value, doc: &Value) -> Value {
    let mut root = schema.clone();
    if let Some(object) = root.as_object_mut() {
        object.insert("components".into(), doc["components"].clone());
    }
    root
}

fn check(schema: &Value, doc: &Value, instance: &Value, what: &str) -> anyhow::Result<()> {
    let validator = jsonschema::validator_for(&rooted(schema, doc))
        .map_err(|e| anyhow::anyhow!("{what}: the document's schema does not compile: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at `{}`", e, e.instance_path()))
        .collect();
    ensure!(
        errors.is_empty(),
        "{what}: {instance} does not match {schema}: {errors:?}"
    );
    Ok(())
}

/// An instance of `schema` (the gateway's own generator: required properties only, the
/// first of every choice, the minimum of every number), checked against the document by
/// the callers.
fn example(schema: &Value, doc: &Value) -> anyhow::Result<Value> {
    let components = doc["components"]["schemas"]
        .as_object()
        .context("the document has no schemas")?;
    shoal::gateway::openapi::example(schema, components)
        .with_context(|| format!("no example of {schema}"))
}

/// The request the document describes for `operation`.
async fn call(
    http: &Http,
    doc: &Value,
    operation: &Operation<'_>,
    serial: usize,
) -> anyhow::Result<HttpResponse> {
    let mut path = operation.path.to_owned();
    for parameter in operation.spec["parameters"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if parameter["in"] != "path" {
            continue;
        }
        let name = parameter["name"].as_str().context("a parameter name")?;
        let value = parameter_value(operation.path, name, serial)?;
        check(
            &parameter["schema"],
            doc,
            &json!(value),
            &format!(
                "{} {}: parameter `{name}`",
                operation.method, operation.path
            ),
        )?;
        path = path.replace(&format!("{{{name}}}"), &value);
    }
    let method = Method::from_bytes(operation.method.to_uppercase().as_bytes())?;
    let mut request = http.client.request(method, http.url(&path));
    let body_schema = &operation.spec["requestBody"]["content"]["application/json"]["schema"];
    if !body_schema.is_null() {
        let body = example(body_schema, doc)?;
        check(body_schema, doc, &body, "the generated body")?;
        request = request.json(&body);
    }
    let streams = operation.spec["responses"]["200"]["content"]
        .get("text/event-stream")
        .is_some();
    if streams {
        // A stream does not end: its status and headers are the answer (the stream's own
        // frames are checked by the notification tests).
        // A refusal is an ordinary JSON answer, read whole.
        let response = request.send().await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = if status.is_success() {
            Vec::new()
        } else {
            response.bytes().await?.to_vec()
        };
        return Ok(HttpResponse {
            status,
            headers,
            body,
        });
    }
    http.send(request).await
}

/// Checks an answer against the document's response for its status.
fn conforms(doc: &Value, operation: &Operation<'_>, answer: &HttpResponse) -> anyhow::Result<()> {
    let what = format!(
        "{} {} answered {}",
        operation.method, operation.path, answer.status
    );
    let responses = &operation.spec["responses"];
    let documented = responses
        .get(answer.status.as_str())
        .or_else(|| responses.get("default"))
        .with_context(|| {
            format!(
                "{what}, a status the document does not list: {}",
                answer.text()
            )
        })?;
    let Some(content) = documented.get("content").and_then(Value::as_object) else {
        ensure!(
            answer.body.is_empty(),
            "{what} with a body the document does not describe"
        );
        return Ok(());
    };
    let content_type = answer
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (media, spec) = content
        .iter()
        .find(|(media, _)| content_type.starts_with(media.as_str()))
        .with_context(|| format!("{what} as `{content_type}`; the document says {content:?}"))?;
    if media == "application/json" {
        let body = answer.json().with_context(|| what.clone())?;
        check(&spec["schema"], doc, &body, &what)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_and_the_server_agree() -> anyhow::Result<()> {
    let (cluster, _runners) = TestCluster::balanced(SHARDS, 1).await?;
    let gateway = Gateway::start(&cluster, GatewayOptions::default()).await?;
    let http = &gateway.http;
    let text = http.get("/openapi.json").await?.text();
    let spec = oas3::from_json(&text).context("the document is not OpenAPI 3.1")?;
    ensure!(spec.openapi.starts_with("3.1"), "version {}", spec.openapi);
    let doc: Value = serde_json::from_str(&text)?;
    let paths = doc["paths"].as_object().context("paths")?;
    let mut checked = 0;
    for (path, item) in paths {
        let item = item.as_object().context("a path item")?;
        for method in METHODS {
            let Some(spec) = item.get(method) else {
                let refused = http
                    .send(http.client.request(
                        Method::from_bytes(method.to_uppercase().as_bytes())?,
                        http.url(&concrete(path)),
                    ))
                    .await?;
                ensure!(
                    refused.status == StatusCode::METHOD_NOT_ALLOWED
                        && refused.error()?.0 == "method_not_allowed",
                    "{method} {path} is not documented but answered {}: {}",
                    refused.status,
                    refused.text()
                );
                continue;
            };
            let operation = Operation { method, path, spec };
            let answer = call(http, &doc, &operation, checked).await?;
            conforms(&doc, &operation, &answer)?;
            eprintln!("{method} {path}: {} conforms", answer.status);
            checked += 1;
        }
    }
    // The built-in types' operations, the generic ones and the application's are all there.
    for path in [
        "/entities/counter/{entity_id}/increment",
        "/entities/probe/{entity_id}/echo",
        "/entities/{entity_type}/{entity_id}/{message}",
        "/counters/{entity_id}",
    ] {
        ensure!(paths.contains_key(path), "{path} is not documented");
    }
    ensure!(checked >= 17, "only {checked} operations checked");
    let unknown = http.get("/not-in-the-document").await?;
    ensure!(
        unknown.status == StatusCode::NOT_FOUND && unknown.error()?.0 == "no_route",
        "{unknown:?}"
    );
    Ok(())
}

/// `path` with every parameter filled in.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|segment| {
            if segment.starts_with('{') {
                "x"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The other direction: what the document forbids (a field a closed body does not have, an
/// id outside the declared pattern) the server refuses with 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_document_forbids_the_server_refuses() -> anyhow::Result<()> {
    let (cluster, _runners) = TestCluster::balanced(SHARDS, 1).await?;
    let gateway = Gateway::start(&cluster, GatewayOptions::default()).await?;
    let http = &gateway.http;
    let doc = http.get("/openapi.json").await?.json()?;
    let mut closed = 0;
    for (path, item) in doc["paths"].as_object().context("paths")? {
        let Some(post) = item.get("post") else {
            continue;
        };
        let schema = &post["requestBody"]["content"]["application/json"]["schema"];
        if schema["additionalProperties"] != false {
            continue;
        }
        let mut body = example(schema, &doc)?;
        body["not_a_field"] = json!(1);
        ensure!(
            jsonschema::validator_for(&rooted(schema, &doc))?
                .iter_errors(&body)
                .next()
                .is_some(),
            "{path}: the document should refuse {body}"
        );
        let answer = http
            .post_json(&path.replace("{entity_id}", "closed-1"), &body, &[])
            .await?;
        ensure!(
            answer.status == StatusCode::BAD_REQUEST && answer.error()?.0 == "bad_message",
            "{path} with {body}: {} {}",
            answer.status,
            answer.text()
        );
        closed += 1;
    }
    ensure!(closed >= 8, "only {closed} closed bodies found");
    let pattern = &doc["paths"]["/entities/counter/{entity_id}/get"]["post"]["parameters"][0];
    ensure!(pattern["name"] == "entity_id", "{pattern}");
    check(
        &pattern["schema"],
        &doc,
        &json!("a b-c_é"),
        "a printable id",
    )?;
    let control = "bad\u{1}id";
    ensure!(
        jsonschema::validator_for(&rooted(&pattern["schema"], &doc))?
            .iter_errors(&json!(control))
            .next()
            .is_some(),
        "the declared pattern should refuse a control character"
    );
    let answer = http
        .post_json("/entities/counter/bad%01id/get", &json!({}), &[])
        .await?;
    ensure!(
        answer.status == StatusCode::BAD_REQUEST && answer.error()?.0 == "bad_entity_id",
        "{} {}",
        answer.status,
        answer.text()
    );
    Ok(())
}

/// schemathesis (a property-based OpenAPI tester nobody here wrote, installed by the test
/// set-up) against a real gateway and cluster, with every check it has: the server must
/// accept what the document allows, refuse what it forbids, answer only the statuses,
/// headers and bodies it declares, and never fail. A fixed seed and a bounded example count
/// keep the run short and repeatable; its report is kept under the target's `tmp/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_failure_of_any_class() -> anyhow::Result<()> {
    let python = tokio::task::spawn_blocking(|| {
        shoal_testkit::python::venv("schemathesis-venv", &[SCHEMATHESIS])
    })
    .await??;
    let st = python.with_file_name("st");
    let (cluster, _runners) = TestCluster::balanced(SHARDS, 1).await?;
    let options = GatewayOptions {
        // The fuzzer sends thousands of requests from one client: the limits are tested by
        // `rate_limit.rs`, here they would only answer 429.
        env: vec![(
            "SHOAL__REDIS__API_LIMITS__ENABLED".to_owned(),
            "false".to_owned(),
        )],
        ..GatewayOptions::default()
    };
    let gateway = Gateway::start(&cluster, options).await?;
    let reports = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("schemathesis")
        .join(&cluster.db.name);
    std::fs::create_dir_all(&reports)?;
    let served = gateway.http.get("/openapi.json").await?;
    std::fs::write(reports.join("openapi.json"), &served.body)?;
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/schemathesis.toml"
    );
    let output = tokio::process::Command::new(&st)
        .args(["--no-color", "--config-file", config])
        .arg("run")
        .arg(format!("http://{}/openapi.json", gateway.addr))
        .args([
            "--checks",
            "all",
            "--seed",
            "20261207",
            "--max-examples",
            "8",
        ])
        .args(["--workers", "1", "--generation-database", "none"])
        // The diagnostic `probe` type sleeps, panics and answers what storage cannot hold
        // on purpose (its own tests drive it); the rest of the document is fuzzed.
        .args(["--exclude-path-regex", "^/entities/probe/"])
        .args(["--suppress-health-check", "too_slow,filter_too_much"])
        // More arguments for a local run, e.g. `--include-path /extractions`.
        .args(
            std::env::var("SHOAL_SCHEMATHESIS_ARGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        .arg("--report")
        .arg("junit")
        .arg("--report-dir")
        .arg(&reports)
        .current_dir(&reports)
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {st:?}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "schemathesis failed ({}); report in {reports:?}:\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{stdout}");
    Ok(())
}

/// The schemathesis release the test runs.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";
