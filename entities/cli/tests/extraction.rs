//! Extraction across real processes: runners and gateways over Postgres and Redis, the
//! built-in extractor, and a local fake provider speaking the OpenAI chat-completions and
//! Anthropic Messages wire formats (testkit `FakeProvider`, which logs every call).

mod common;

use std::time::Duration;

use anyhow::{Context, ensure};
use common::gateway::{Gateway, GatewayOptions, Http, HttpResponse};
use common::{Runner, RunnerOptions, TestCluster, wait_until};
use reqwest::StatusCode;
use serde_json::{Value, json};
use shoal_testkit::provider::{Behaviour, FakeProvider};

/// Longer than the testkit's default: limit windows are a minute.
const LONG: Duration = Duration::from_secs(150);

const BIOGRAPHIES: &str = "Marie Curie was a Polish and naturalised-French physicist and \
chemist who conducted pioneering research on radioactivity. She studied at the University \
of Paris, where she met Pierre Curie. In 1906 Curie became the first woman to become a \
professor at the University of Paris. Marie Curie founded the Radium Institute in 1914.\n\n\
Alan Turing was an English mathematician and computer scientist. Alan Turing studied at \
King's College in Cambridge. After the war Alan Turing worked at the National Physical \
Laboratory, where he designed the Automatic Computing Engine.";

/// What every node of a test gets: its Redis prefix, and the fake provider as `oai`
/// (OpenAI-compatible) and `claude` (Anthropic), with `extra` on top.
fn env(
    cluster: &TestCluster,
    fake: Option<&FakeProvider>,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "SHOAL__REDIS__URL".to_owned(),
            shoal_testkit::redis::redis_url(),
        ),
        (
            "SHOAL__REDIS__KEY_PREFIX".to_owned(),
            format!("shoal-test:{}", cluster.db.name),
        ),
        (
            "SHOAL__EXTRACTION__BACKOFF_FIRST".to_owned(),
            "100ms".to_owned(),
        ),
        ("SHOAL__EXTRACTION__BACKOFF_MAX".to_owned(), "1s".to_owned()),
    ];
    if let Some(fake) = fake {
        for (name, kind, model) in [
            ("OAI", "openai", "gpt-test"),
            ("CLAUDE", "anthropic", "claude-test"),
        ] {
            let key = |k: &str| format!("SHOAL__EXTRACTION__PROVIDERS__{name}__{k}");
            env.push((key("KIND"), kind.to_owned()));
            env.push((key("BASE_URL"), fake.base_url()));
            env.push((key("MODEL"), model.to_owned()));
            env.push((key("API_KEY"), "sk-test".to_owned()));
        }
    }
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    env
}

struct Nodes {
    cluster: TestCluster,
    runners: Vec<Runner>,
    gateways: Vec<Gateway>,
    env: Vec<(String, String)>,
}

impl Nodes {
    async fn start(
        runners: usize,
        gateways: usize,
        fake: Option<&FakeProvider>,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let cluster = TestCluster::new(16).await?;
        let env = env(&cluster, fake, extra);
        let mut nodes = Self {
            cluster,
            runners: Vec::new(),
            gateways: Vec::new(),
            env,
        };
        for _ in 0..runners {
            nodes.add_runner().await?;
        }
        nodes
            .cluster
            .await_balanced(&nodes.runners.iter().collect::<Vec<_>>())
            .await?;
        for _ in 0..gateways {
            nodes.add_gateway().await?;
        }
        Ok(nodes)
    }

    async fn add_runner(&mut self) -> anyhow::Result<()> {
        let options = RunnerOptions {
            env: self.env.clone(),
            ..RunnerOptions::default()
        };
        self.runners
            .push(self.cluster.start_runner_with(options).await?);
        Ok(())
    }

    async fn add_gateway(&mut self) -> anyhow::Result<()> {
        let options = GatewayOptions {
            env: self.env.clone(),
            redis_url: None,
            listen: None,
        };
        self.gateways
            .push(Gateway::start(&self.cluster, options).await?);
        Ok(())
    }

    fn http(&self) -> &Http {
        &self.gateways[0].http
    }
}

fn request(text: &str, provider: &str) -> Value {
    json!({"text": text, "ontology_id": "foaf", "options": {"provider": provider}})
}

async fn post(http: &Http, body: &Value, wait: bool) -> anyhow::Result<HttpResponse> {
    let path = if wait {
        "/extractions?wait=true"
    } else {
        "/extractions"
    };
    http.post_json(path, body, &[]).await
}

/// Starts an extraction; returns its id.
async fn start(http: &Http, body: &Value) -> anyhow::Result<String> {
    let response = post(http, body, false).await?;
    ensure!(
        matches!(response.status, StatusCode::ACCEPTED | StatusCode::OK),
        "{} {}",
        response.status,
        response.text()
    );
    Ok(response.json()?["id"].as_str().context("an id")?.to_owned())
}

async fn show(http: &Http, id: &str) -> anyhow::Result<Value> {
    let response = http.get(&format!("/extractions/{id}")).await?;
    ensure!(
        response.status == StatusCode::OK,
        "{} {}",
        response.status,
        response.text()
    );
    response.json()
}

/// Waits until the extraction's status is one of `statuses`; returns it.
async fn await_status(
    http: &Http,
    id: &str,
    statuses: &[&str],
    deadline: Duration,
) -> anyhow::Result<Value> {
    let last = std::sync::Mutex::new(Value::Null);
    let waited = wait_until(
        deadline,
        &format!("extraction {id} in {statuses:?}"),
        || async {
            let view = show(http, id).await?;
            let done = statuses.iter().any(|s| view["status"] == *s);
            *last.lock().unwrap_or_else(|e| e.into_inner()) = view;
            Ok(done)
        },
    )
    .await;
    let view = last.into_inner().unwrap_or_else(|e| e.into_inner());
    waited.with_context(|| format!("last seen: {view}"))?;
    Ok(view)
}

/// One SSE event.
#[derive(Debug, Clone, PartialEq)]
struct Sse {
    id: i64,
    event: String,
    data: Value,
}

/// Reads `/extractions/{id}/events` to its end.
async fn events(http: &Http, id: &str, last_event_id: Option<i64>) -> anyhow::Result<Vec<Sse>> {
    let mut request = http
        .client
        .get(http.url(&format!("/extractions/{id}/events")));
    if let Some(last) = last_event_id {
        request = request.header("Last-Event-ID", last.to_string());
    }
    let response = tokio::time::timeout(common::DEADLINE, request.send()).await??;
    ensure!(
        response.status() == StatusCode::OK,
        "events: {}",
        response.status()
    );
    let content_type = response.headers()["content-type"].to_str()?.to_owned();
    ensure!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let text = tokio::time::timeout(common::DEADLINE, response.text())
        .await
        .context("the stream did not end after complete/failed")??;
    let mut out = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let field = |name: &str| {
            block.lines().find_map(|l| {
                l.strip_prefix(&format!("{name}:"))
                    .map(|v| v.trim().to_owned())
            })
        };
        let (Some(id), Some(event), Some(data)) = (field("id"), field("event"), field("data"))
        else {
            continue; // a keep-alive comment
        };
        out.push(Sse {
            id: id.parse()?,
            event,
            data: serde_json::from_str(&data)?,
        });
    }
    Ok(out)
}

fn stages_in(events: &[Sse]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.event == "progress")
        .map(|e| e.data["stage"].as_str().unwrap_or("").to_owned())
        .collect()
}

const STAGES: [&str; 5] = ["preprocess", "entities", "resolve", "relations", "persist"];

/// Parses JSON-LD with rdflib (PyPI, in a venv the test installs) and answers what it
/// read: `{triples, persons, organizations, links}`.
fn rdflib_read(document: &str) -> anyhow::Result<Value> {
    let python = shoal_testkit::python::venv("rdflib-venv", &["rdflib==7.6.0"])?;
    let script = r#"
import json, sys, rdflib
g = rdflib.Graph()
g.parse(data=sys.stdin.read(), format="json-ld")
FOAF = rdflib.Namespace("http://xmlns.com/foaf/0.1/")
links = [t for t in g if t[1] != rdflib.RDF.type and isinstance(t[2], rdflib.URIRef)]
print(json.dumps({"triples": len(g),
  "persons": len(set(g.subjects(rdflib.RDF.type, FOAF.Person))),
  "organizations": len(set(g.subjects(rdflib.RDF.type, FOAF.Organization))),
  "links": len(links)}))
"#;
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(
        &mut child.stdin.take().context("stdin")?,
        document.as_bytes(),
    )?;
    let output = child.wait_with_output()?;
    ensure!(
        output.status.success(),
        "rdflib: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builtin_extractor_types_biographies_with_foaf() -> anyhow::Result<()> {
    let nodes = Nodes::start(1, 1, None, &[]).await?;
    let http = nodes.http();
    let response = post(http, &request(BIOGRAPHIES, "builtin"), true).await?;
    ensure!(
        response.status == StatusCode::OK,
        "{} {}",
        response.status,
        response.text()
    );
    let view = response.json()?;
    ensure!(view["status"] == "completed", "{view}");
    let result = &view["result"];
    let typed = |class: &str| {
        result["entities"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|e| e["type"] == class)
                    .map(|e| e["name"].clone())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let persons = typed("foaf:Person");
    let organizations = typed("foaf:Organization");
    ensure!(
        persons.contains(&json!("Marie Curie")) && persons.contains(&json!("Alan Turing")),
        "{result}"
    );
    ensure!(
        organizations.contains(&json!("University of Paris")),
        "{result}"
    );
    let relations = result["relations"].as_array().context("relations")?;
    ensure!(!relations.is_empty(), "no relation: {result}");
    ensure!(
        relations.iter().any(|r| r["predicate"] == "shoal:memberOf"),
        "{result}"
    );
    let stages: Vec<&str> = view["stages"]
        .as_array()
        .context("stages")?
        .iter()
        .filter_map(|s| s["stage"].as_str())
        .collect();
    ensure!(stages == STAGES, "{stages:?}");
    let id = view["id"].as_str().context("id")?;

    // JSON-LD, read by an independent RDF library.
    let ld = http
        .send(
            http.client
                .get(http.url(&format!("/extractions/{id}")))
                .header("Accept", "application/ld+json"),
        )
        .await?;
    ensure!(ld.status == StatusCode::OK, "{}", ld.text());
    ensure!(
        ld.headers["content-type"]
            .to_str()?
            .starts_with("application/ld+json")
    );
    let read = rdflib_read(&ld.text())?;
    ensure!(
        read["persons"].as_u64() >= Some(2) && read["organizations"].as_u64() >= Some(2),
        "{read}"
    );
    ensure!(
        read["links"].as_u64() == Some(relations.len() as u64),
        "{read} vs {relations:?}"
    );

    // The journal as SSE: every stage in order, then complete; a reconnect resumes.
    let all = events(http, id, None).await?;
    ensure!(
        all.first().map(|e| e.event.as_str()) == Some("started"),
        "{all:?}"
    );
    ensure!(stages_in(&all) == STAGES, "{all:?}");
    ensure!(
        all.last().map(|e| e.event.as_str()) == Some("complete"),
        "{all:?}"
    );
    ensure!(
        all.last().map(|e| &e.data["result"]) == Some(result),
        "{all:?}"
    );
    ensure!(all.windows(2).all(|w| w[1].id == w[0].id + 1), "{all:?}");
    let resumed = events(http, id, Some(all[2].id)).await?;
    ensure!(resumed == all[3..], "{resumed:?}");

    // Live: a stream opened at once follows the run to its end.
    let second = start(
        http,
        &request("Ada Lovelace worked with Charles Babbage.", "builtin"),
    )
    .await?;
    let live = events(http, &second, None).await?;
    ensure!(stages_in(&live) == STAGES, "{live:?}");
    ensure!(
        live.last().map(|e| e.event.as_str()) == Some("complete"),
        "{live:?}"
    );
    let knows = &live.last().context("last")?.data["result"]["relations"];
    ensure!(knows[0]["predicate"] == "foaf:knows", "{knows}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_400_naming_the_problem() -> anyhow::Result<()> {
    let nodes = Nodes::start(1, 1, None, &[]).await?;
    let http = nodes.http();
    // An ontology this gateway does not know (ontologies reload): a 422.
    let unknown = post(http, &json!({"text": "x", "ontology_id": "nope"}), false).await?;
    ensure!(
        unknown.status == StatusCode::UNPROCESSABLE_ENTITY
            && unknown.error()?.0 == "unknown_ontology"
            && unknown.text().contains("ontology_id"),
        "{} {}",
        unknown.status,
        unknown.text()
    );
    for (body, code, names) in [
        (
            json!({"text": "  ", "ontology_id": "foaf"}),
            "bad_text",
            "text",
        ),
        (
            json!({"text": "x", "ontology_id": "foaf", "options": {"provider": "nope"}}),
            "unknown_provider",
            "provider",
        ),
        (
            json!({"text": "x", "ontology_id": "foaf", "options": {"temperature": 3.0}}),
            "bad_option",
            "temperature",
        ),
        (
            json!({"text": "x", "ontology_id": "foaf", "options": {"max_tokens": 0}}),
            "bad_option",
            "max_tokens",
        ),
        (
            json!({"text": "x", "ontology_id": "foaf", "extra": 1}),
            "bad_body",
            "extra",
        ),
        (json!({"ontology_id": "foaf"}), "bad_body", "text"),
    ] {
        let response = post(http, &body, false).await?;
        ensure!(
            response.status == StatusCode::BAD_REQUEST,
            "{body}: {} {}",
            response.status,
            response.text()
        );
        let (got, _) = response.error()?;
        ensure!(
            got == code && response.text().contains(names),
            "{body}: {}",
            response.text()
        );
    }
    let malformed = http
        .post_raw("/extractions", b"{not json".to_vec(), &[])
        .await?;
    ensure!(
        malformed.status == StatusCode::BAD_REQUEST && malformed.error()?.0 == "malformed_json"
    );
    let bad_id = http.get("/extractions/nope").await?;
    ensure!(
        bad_id.status == StatusCode::BAD_REQUEST && bad_id.error()?.0 == "bad_id",
        "{}",
        bad_id.text()
    );
    let unknown = format!("/extractions/ex-{}", "0".repeat(32));
    let missing = http.get(&unknown).await?;
    ensure!(
        missing.status == StatusCode::NOT_FOUND,
        "{}",
        missing.text()
    );
    let no_events = http.get(&format!("{unknown}/events")).await?;
    ensure!(
        no_events.status == StatusCode::NOT_FOUND,
        "{}",
        no_events.text()
    );
    let id = start(
        http,
        &request(
            "Grace Hopper joined the Harvard Computation Laboratory.",
            "builtin",
        ),
    )
    .await?;
    await_status(http, &id, &["completed"], common::DEADLINE).await?;
    let bad_resume = http
        .send(
            http.client
                .get(http.url(&format!("/extractions/{id}/events")))
                .header("Last-Event-ID", "x"),
        )
        .await?;
    ensure!(
        bad_resume.status == StatusCode::BAD_REQUEST,
        "{}",
        bad_resume.text()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_extractions_through_both_wire_formats() -> anyhow::Result<()> {
    let fake = FakeProvider::start().await?;
    let nodes = Nodes::start(1, 1, Some(&fake), &[]).await?;
    let http = nodes.http();
    for (provider, api, model) in [
        ("oai", "openai", "gpt-test"),
        ("claude", "anthropic", "claude-test"),
    ] {
        let response = post(
            http,
            &request("Ada Lovelace and the Analytical Society.", provider),
            true,
        )
        .await?;
        ensure!(
            response.status == StatusCode::OK,
            "{provider}: {} {}",
            response.status,
            response.text()
        );
        let view = response.json()?;
        ensure!(view["status"] == "completed", "{provider}: {view}");
        let result = &view["result"];
        ensure!(
            result["model"] == model && result["provider"] == provider,
            "{result}"
        );
        ensure!(
            result["entities"].as_array().map(Vec::len) == Some(3),
            "{result}"
        );
        ensure!(
            result["relations"].as_array().map(Vec::len) == Some(2),
            "{result}"
        );
        let calls: Vec<_> = fake.calls().into_iter().filter(|c| c.api == api).collect();
        let tasks: Vec<&str> = calls.iter().map(|c| c.task.as_str()).collect();
        ensure!(tasks == ["mentions", "relations"], "{provider}: {calls:?}");
        ensure!(calls.iter().all(|c| c.model == model), "{calls:?}");
    }
    // Another model is another extraction (never the cached one).
    let other = json!({"text": "Ada Lovelace and the Analytical Society.", "ontology_id": "foaf",
        "options": {"provider": "oai", "model": "gpt-other"}});
    let view = post(http, &other, true).await?.json()?;
    ensure!(
        view["cached"] == false && view["result"]["model"] == "gpt-other",
        "{view}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_requests_through_two_gateways_run_once() -> anyhow::Result<()> {
    let fake = FakeProvider::start().await?;
    fake.set_latency(Duration::from_millis(300));
    let nodes = Nodes::start(2, 2, Some(&fake), &[]).await?;
    let body = request("Ada Lovelace corresponded with Charles Babbage.", "oai");
    let sends = (0..20).map(|i| {
        let http = nodes.gateways[i % 2].http.clone();
        let body = body.clone();
        async move { start(&http, &body).await }
    });
    let ids = futures::future::try_join_all(sends).await?;
    ensure!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    let view = await_status(nodes.http(), &ids[0], &["completed"], common::DEADLINE).await?;
    ensure!(
        fake.calls_of("mentions") == 1 && fake.calls_of("relations") == 1,
        "{:?}",
        fake.calls()
    );
    ensure!(view["dedup_hits"] == 19, "{view}");
    Ok(())
}

/// The runner that owns `id`'s shard (the extraction type is internal; a shard is a
/// function of the id alone, so the public counter of the same id explains it).
async fn owner_of(nodes: &Nodes, id: &str) -> anyhow::Result<usize> {
    let explain = nodes
        .http()
        .get(&format!("/entities/counter/{id}"))
        .await?
        .json()?;
    let owner = explain["owner_runner_id"].as_i64().context("an owner")?;
    for (i, runner) in nodes.runners.iter().enumerate() {
        if i64::from(runner.id().await?.get()) == owner {
            return Ok(i);
        }
    }
    anyhow::bail!("no runner has id {owner}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_stages_resumes_without_calling_finished_stages() -> anyhow::Result<()> {
    let fake = FakeProvider::start().await?;
    fake.hold("relations");
    let mut nodes = Nodes::start(2, 1, Some(&fake), &[]).await?;
    let id = start(
        nodes.http(),
        &request("Ada Lovelace joined the Analytical Society.", "oai"),
    )
    .await?;
    wait_until(common::DEADLINE, "the relations call", || async {
        Ok(fake.calls_of("relations") == 1)
    })
    .await?;
    let owner = owner_of(&nodes, &id).await?;
    nodes.runners[owner].kill()?;
    fake.release();
    let view = await_status(nodes.http(), &id, &["completed"], common::DEADLINE).await?;
    ensure!(
        fake.calls_of("mentions") == 1,
        "entities called again: {:?}",
        fake.calls()
    );
    ensure!(fake.calls_of("relations") == 2, "{:?}", fake.calls());
    let runs: Vec<&Value> = view["stages"]
        .as_array()
        .context("stages")?
        .iter()
        .collect();
    ensure!(runs.len() == 5, "{view}");
    let events = events(nodes.http(), &id, None).await?;
    ensure!(stages_in(&events) == STAGES, "{events:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_stage_resumes_at_its_first_unfinished_chunk() -> anyhow::Result<()> {
    let fake = FakeProvider::start().await?;
    // The third mentions call fails; the two chunks before it are done.
    fake.script([
        Behaviour::Ok,
        Behaviour::Ok,
        Behaviour::Status {
            status: 503,
            retry_after: None,
        },
    ]);
    let nodes = Nodes::start(
        1,
        1,
        Some(&fake),
        &[("SHOAL__EXTRACTION__CHUNK_TOKENS", "16")],
    )
    .await?;
    let text = "Ada Lovelace joined the Analytical Society with Charles Babbage. ".repeat(5);
    let response = post(nodes.http(), &request(&text, "oai"), true).await?;
    let view = response.json()?;
    ensure!(view["status"] == "completed", "{view}");
    let entities = &view["stages"][1];
    ensure!(
        entities["failed_attempts"] == 1 && entities["chunks_reused"] == 2,
        "{view}"
    );
    // Every chunk was asked for relations once, and for mentions once, except the one
    // that failed (twice): the chunks finished before the failure were not asked again.
    let chunks = fake.calls_of("relations");
    ensure!(chunks >= 3, "{:?}", fake.calls());
    ensure!(
        fake.calls_of("mentions") == chunks + 1,
        "{:?}",
        fake.calls()
    );
    ensure!(entities["provider_calls"] == chunks + 1, "{view}");
    // The stage's checkpoint holds its chunks now: their rows are gone.
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM shoal_extraction_chunks")
        .fetch_one(&nodes.cluster.pool)
        .await?;
    ensure!(left == 0, "{left} chunk rows left");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_failures_retry_then_the_breaker_pauses_every_runner() -> anyhow::Result<()> {
    let fake = FakeProvider::start().await?;
    fake.script([Behaviour::Status {
        status: 429,
        retry_after: Some(1),
    }]);
    fake.set_default(Behaviour::Status {
        status: 503,
        retry_after: None,
    });
    let extra = [
        ("SHOAL__REDIS__BREAKER__FAILURE_THRESHOLD", "3"),
        ("SHOAL__REDIS__BREAKER__RESET_TIMEOUT", "60s"),
        ("SHOAL__EXTRACTION__STAGE_ATTEMPTS", "20"),
    ];
    let nodes = Nodes::start(2, 1, Some(&fake), &extra).await?;
    let http = nodes.http();
    let first = start(http, &request("Ada Lovelace, first.", "claude")).await?;
    let view = await_status(http, &first, &["provider_unavailable"], common::DEADLINE).await?;
    let calls = fake.calls();
    ensure!(calls.len() == 3, "{calls:?}");
    ensure!(
        calls[0].status == 429 && calls[1].status == 503,
        "{calls:?}"
    );
    // The 429's Retry-After (1 s) held the second attempt back.
    ensure!(calls[1].at_ms - calls[0].at_ms >= 1000, "{calls:?}");
    let run = &view["stages"][1];
    ensure!(
        run["stage"] == "entities" && run["failed_attempts"] == 3,
        "{view}"
    );
    // Extractions owned by each runner pause too, without calling the provider.
    let mut owners = std::collections::BTreeSet::new();
    for n in 0..20 {
        if owners.len() == 2 {
            break;
        }
        let body = request(&format!("Ada Lovelace, number {n}."), "claude");
        let id = start(http, &body).await?;
        let owner = owner_of(&nodes, &id).await?;
        if owners.insert(owner) {
            let view = await_status(http, &id, &["provider_unavailable"], common::DEADLINE).await?;
            ensure!(view["stages"][1]["provider_calls"] == 0, "{view}");
        }
    }
    ensure!(owners.len() == 2, "{owners:?}");
    ensure!(fake.calls().len() == 3, "{:?}", fake.calls());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_output_is_retried_a_bounded_number_of_times_then_fails_typed() -> anyhow::Result<()>
{
    let fake = FakeProvider::start().await?;
    fake.set_default(Behaviour::InvalidOutput);
    let nodes = Nodes::start(
        1,
        1,
        Some(&fake),
        &[("SHOAL__EXTRACTION__INVALID_OUTPUT_ATTEMPTS", "3")],
    )
    .await?;
    for provider in ["oai", "claude"] {
        let response = post(nodes.http(), &request("Ada Lovelace.", provider), true).await?;
        let view = response.json()?;
        ensure!(view["status"] == "failed", "{view}");
        ensure!(
            view["error"]["kind"] == "invalid_output" && view["error"]["stage"] == "entities",
            "{view}"
        );
        ensure!(view["stages"][1]["invalid_outputs"] == 3, "{view}");
        let id = view["id"].as_str().context("id")?;
        let events = events(nodes.http(), id, None).await?;
        ensure!(
            events.last().map(|e| e.event.as_str()) == Some("failed"),
            "{events:?}"
        );
        ensure!(
            events.last().map(|e| &e.data["error"]) == Some(&view["error"]),
            "{events:?}"
        );
    }
    ensure!(fake.calls().len() == 6, "{:?}", fake.calls());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_result_answers_after_every_process_restarted() -> anyhow::Result<()> {
    let fake = FakeProvider::start().await?;
    let mut nodes = Nodes::start(1, 1, Some(&fake), &[]).await?;
    let body = request("Ada Lovelace and Charles Babbage.", "oai");
    let first = post(nodes.http(), &body, true).await?.json()?;
    ensure!(
        first["status"] == "completed" && first["cached"] == false,
        "{first}"
    );
    ensure!(fake.calls().len() == 2, "{:?}", fake.calls());
    for runner in &mut nodes.runners {
        runner.kill()?;
    }
    for gateway in &mut nodes.gateways {
        gateway.kill()?;
    }
    nodes.runners.clear();
    nodes.gateways.clear();
    nodes.add_runner().await?;
    nodes.add_gateway().await?;
    let again = post(nodes.http(), &body, false).await?;
    ensure!(
        again.status == StatusCode::OK,
        "{} {}",
        again.status,
        again.text()
    );
    let again = again.json()?;
    ensure!(
        again["cached"] == true && again["result"] == first["result"],
        "{again}"
    );
    // Without the Redis entry, the durable copy in Postgres answers.
    let redis = shoal::redis::RedisClient::connect(
        &shoal::config::RedisConfig {
            url: Some(shoal_testkit::redis::redis_url()),
            key_prefix: Some(format!("shoal-test:{}", nodes.cluster.db.name)),
            ..Default::default()
        },
        &shoal::ids::ClusterName::new("test")?,
    )?;
    shoal_testkit::redis::delete_prefixed(&redis).await;
    let durable = post(nodes.http(), &body, false).await?.json()?;
    ensure!(
        durable["cached"] == true && durable["result"] == first["result"],
        "{durable}"
    );
    ensure!(fake.calls().len() == 2, "{:?}", fake.calls());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_a_clear_503() -> anyhow::Result<()> {
    let mut redis = shoal_testkit::OwnRedis::start().await?;
    let url = redis.url();
    let nodes = Nodes::start(
        1,
        1,
        None,
        &[
            ("SHOAL__REDIS__URL", url.as_str()),
            ("SHOAL__REDIS__MAX_RETRIES", "0"),
        ],
    )
    .await?;
    let body = request("Ada Lovelace.", "builtin");
    ensure!(post(nodes.http(), &body, true).await?.status == StatusCode::OK);
    redis.kill().await?;
    let down = post(nodes.http(), &request("Charles Babbage.", "builtin"), false).await?;
    ensure!(
        down.status == StatusCode::SERVICE_UNAVAILABLE,
        "{} {}",
        down.status,
        down.text()
    );
    ensure!(down.error()?.0 == "redis_unavailable", "{}", down.text());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_runners_hold_the_providers_requests_per_minute_and_concurrency() -> anyhow::Result<()>
{
    let fake = FakeProvider::start().await?;
    fake.set_latency(Duration::from_millis(400));
    let extra = [
        ("SHOAL__REDIS__PROVIDERS__OAI__REQUESTS_PER_MINUTE", "6"),
        ("SHOAL__REDIS__PROVIDERS__OAI__CONCURRENCY", "2"),
    ];
    let nodes = Nodes::start(3, 1, Some(&fake), &extra).await?;
    let http = nodes.http();
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(start(http, &request(&format!("Ada Lovelace, text {n}."), "oai")).await?);
    }
    for id in &ids {
        await_status(http, id, &["completed"], LONG).await?;
    }
    let calls = fake.calls();
    ensure!(calls.len() == 10, "{calls:?}");
    let mut per_minute = std::collections::BTreeMap::<u64, usize>::new();
    for call in &calls {
        *per_minute.entry(call.at_ms / 60_000).or_default() += 1;
    }
    ensure!(per_minute.values().all(|n| *n <= 6), "{per_minute:?}");
    ensure!(fake.max_in_flight() <= 2, "{}", fake.max_in_flight());
    let waited = http.get("/metrics").await?.text();
    ensure!(
        waited.contains("shoal_extraction_cache_total"),
        "gateway metrics"
    );
    Ok(())
}

/// The gateway reads the journal again when the runner that appended wakes it: with the
/// fallback read an hour away, a stream (and a `?wait=true`) still follows a run live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_are_woken_by_the_runner_that_appends() -> anyhow::Result<()> {
    let fake = FakeProvider::start().await?;
    let nodes = Nodes::start(
        1,
        1,
        Some(&fake),
        &[("SHOAL__NOTIFICATIONS__SYNC_INTERVAL", "1h")],
    )
    .await?;
    let http = nodes.http().clone();

    fake.hold("relations");
    let id = start(&http, &request("Grace Hopper joined the Navy.", "oai")).await?;
    wait_until(common::DEADLINE, "the relations call", || async {
        Ok(fake.calls_of("relations") == 1)
    })
    .await?;
    // Open while the run waits on its provider: the stream has read what is there.
    let reader = tokio::spawn({
        let (http, id) = (http.clone(), id.clone());
        async move { events(&http, &id, None).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(!reader.is_finished(), "the stream ended before the run did");
    fake.release();
    let live = reader.await??;
    ensure!(stages_in(&live) == STAGES, "{live:?}");
    ensure!(
        live.last().map(|e| e.event.as_str()) == Some("complete"),
        "{live:?}"
    );

    fake.hold("relations");
    let waiting = tokio::spawn({
        let http = http.clone();
        async move {
            post(
                &http,
                &request("Ada Lovelace met Charles Babbage.", "oai"),
                true,
            )
            .await
        }
    });
    wait_until(common::DEADLINE, "the second relations call", || async {
        Ok(fake.calls_of("relations") == 2)
    })
    .await?;
    fake.release();
    let answer = tokio::time::timeout(common::DEADLINE, waiting).await???;
    ensure!(
        answer.status == StatusCode::OK,
        "{} {}",
        answer.status,
        answer.text()
    );
    ensure!(answer.json()?["status"] == "completed", "{}", answer.text());
    Ok(())
}

/// Journal rows of `id`.
async fn journal_rows(nodes: &Nodes, id: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM shoal_extraction_events WHERE extraction_id = $1")
            .bind(id)
            .fetch_one(&nodes.cluster.pool)
            .await?,
    )
}

/// Runs an extraction of `text` by `provider` to completion; its id.
async fn complete(http: &Http, text: &str, provider: &str) -> anyhow::Result<String> {
    let view = post(http, &request(text, provider), true).await?.json()?;
    ensure!(view["status"] == "completed", "{view}");
    Ok(view["id"].as_str().context("id")?.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_journals_old_chunks_and_old_results_are_pruned_running_ones_kept()
-> anyhow::Result<()> {
    let fake = FakeProvider::start().await?;
    let extra = [
        ("SHOAL__EXTRACTION__KEEP_HANDLE", "500ms"),
        ("SHOAL__EXTRACTION__JOURNAL_RETENTION", "1s"),
        ("SHOAL__EXTRACTION__RESULT_RETENTION", "1h"),
        ("SHOAL__EXTRACTION__PRUNE_INTERVAL", "200ms"),
    ];
    let nodes = Nodes::start(1, 1, Some(&fake), &extra).await?;
    let http = nodes.http();
    let pool = &nodes.cluster.pool;
    let ended = complete(http, "Ada Lovelace, ended.", "oai").await?;
    ensure!(journal_rows(&nodes, &ended).await? > 0);
    // What a crash between a chunk's row and its stage's checkpoint leaves, and a result
    // past its retention.
    sqlx::query(
        "INSERT INTO shoal_extraction_chunks (cluster, extraction_id, generation, stage, chunk, output, created_at)
         VALUES ($1, 'orphan', 1, 'entities', 0, '{}', now() - interval '1 day')",
    )
    .bind(&nodes.cluster.name)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO shoal_extraction_results (cluster, extraction_id, result, created_at)
         VALUES ($1, 'old-result', '{}', now() - interval '2 hours')",
    )
    .bind(&nodes.cluster.name)
    .execute(pool)
    .await?;
    // A run held in its relations stage, its journal older than the retention.
    fake.hold("relations");
    let running = start(http, &request("Ada Lovelace, running.", "oai")).await?;
    wait_until(common::DEADLINE, "the running relations call", || async {
        Ok(fake.calls_of("relations") == 2)
    })
    .await?;
    let kept = journal_rows(&nodes, &running).await?;
    ensure!(kept == 4, "started and three stages, not {kept}");
    wait_until(common::DEADLINE, "the ended journal pruned", || async {
        Ok(journal_rows(&nodes, &ended).await? == 0)
    })
    .await?;
    wait_until(common::DEADLINE, "the orphan chunk and old result pruned", || async {
        let left: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM shoal_extraction_chunks)
                  + (SELECT count(*) FROM shoal_extraction_results WHERE extraction_id = 'old-result')",
        )
        .fetch_one(pool)
        .await?;
        Ok(left == 0)
    })
    .await?;
    // A pass that ran after the running journal was past the retention: one more ended
    // extraction's journal going proves it.
    wait_until(
        common::DEADLINE,
        "the running journal past the retention",
        || async {
            let old: bool = sqlx::query_scalar(
                "SELECT max(created_at) < now() - interval '1.5 seconds'
               FROM shoal_extraction_events WHERE extraction_id = $1",
            )
            .bind(&running)
            .fetch_one(pool)
            .await?;
            Ok(old)
        },
    )
    .await?;
    let later = complete(http, "Charles Babbage, later.", "builtin").await?;
    wait_until(common::DEADLINE, "the later journal pruned", || async {
        Ok(journal_rows(&nodes, &later).await? == 0)
    })
    .await?;
    let kept = journal_rows(&nodes, &running).await?;
    ensure!(kept == 4, "the running journal lost rows: {kept} left");
    // The result of a pruned journal stays; the running run finishes from its checkpoints.
    let results: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM shoal_extraction_results WHERE extraction_id = $1",
    )
    .bind(&ended)
    .fetch_one(pool)
    .await?;
    ensure!(results == 1, "the ended result went with its journal");
    fake.release();
    await_status(http, &running, &["completed"], common::DEADLINE).await?;
    ensure!(fake.calls_of("mentions") == 2, "{:?}", fake.calls());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ontology_added_or_changed_is_served_without_a_restart() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("shoal-ontologies-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let dir_text = dir.display().to_string();
    // The gateway re-reads the directory every 200 ms; the runner only when a request
    // pins a version it has not read.
    let interval = "SHOAL__EXTRACTION__ONTOLOGY_RELOAD_INTERVAL";
    let extra = [
        ("SHOAL__EXTRACTION__ONTOLOGIES", dir_text.as_str()),
        (interval, "1h"),
    ];
    let mut nodes = Nodes::start(1, 0, None, &extra).await?;
    nodes.env.push((interval.to_owned(), "200ms".to_owned()));
    nodes.add_gateway().await?;
    let http = nodes.http();
    let body = |text: &str| json!({"text": text, "ontology_id": "ships", "options": {}});
    let refused = post(http, &body("The Ship Endeavour sailed."), true).await?;
    ensure!(
        refused.status == StatusCode::UNPROCESSABLE_ENTITY
            && refused.json()?["error"]["code"] == "unknown_ontology",
        "{} {}",
        refused.status,
        refused.text()
    );
    let ships = "@prefix owl: <http://www.w3.org/2002/07/owl#> .\n\
        @prefix rdfs: <http://www.w3.org/2000/01/rdf-schema#> .\n\
        @prefix skos: <http://www.w3.org/2004/02/skos/core#> .\n\
        @prefix ex: <http://example.org/ships#> .\n\
        ex:Ship a owl:Class ; rdfs:label \"Ship\" ; skos:altLabel \"Ship\" .\n";
    std::fs::write(dir.join("ships.ttl"), ships)?;
    // The gateway offers it and the runner runs it, neither restarted.
    let seen = std::sync::Mutex::new(Value::Null);
    let last = |view: Value| *seen.lock().unwrap_or_else(|e| e.into_inner()) = view;
    wait_until(common::DEADLINE, "the new ontology served", || async {
        let response = post(http, &body("The Ship Endeavour sailed."), true).await?;
        if response.status != StatusCode::OK {
            return Ok(false);
        }
        last(response.json()?);
        Ok(true)
    })
    .await?;
    let first = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    ensure!(first["status"] == "completed", "{first}");
    let v1 = first["result"]["ontology_version"].clone();
    // A changed file is a new version: a new request pins it and runs on it.
    std::fs::write(
        dir.join("ships.ttl"),
        format!("{ships}ex:Port a owl:Class ; rdfs:label \"Port\" ; skos:altLabel \"Port\" .\n"),
    )?;
    wait_until(common::DEADLINE, "the changed ontology served", || async {
        let response = post(http, &body("The Ship Resolution left Port Jackson."), true).await?;
        ensure!(response.status == StatusCode::OK, "{}", response.text());
        let view = response.json()?;
        let changed = view["result"]["ontology_version"] != v1;
        last(view);
        Ok(changed)
    })
    .await?;
    let second = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    ensure!(second["status"] == "completed", "{second}");
    let classes: Vec<&str> = second["result"]["entities"]
        .as_array()
        .context("entities")?
        .iter()
        .filter_map(|e| e["class_iri"].as_str())
        .collect();
    ensure!(classes.iter().any(|c| c.contains("Port")), "{second}");
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_pinned_to_an_ontology_version_finishes_on_a_runner_that_never_read_it()
-> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("shoal-ontologies-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let dir_text = dir.display().to_string();
    // `people` is the default FOAF ontology under another id (the fake answers in FOAF).
    let people = include_str!("../../../cluster-config/ontologies/foaf.ttl");
    std::fs::write(dir.join("people.ttl"), people)?;
    let fake = FakeProvider::start().await?;
    fake.hold("mentions");
    let extra = [
        ("SHOAL__EXTRACTION__ONTOLOGIES", dir_text.as_str()),
        ("SHOAL__EXTRACTION__ONTOLOGY_RELOAD_INTERVAL", "200ms"),
    ];
    let mut nodes = Nodes::start(1, 1, Some(&fake), &extra).await?;
    let body = json!({"text": "Ada Lovelace joined the Analytical Society.",
                      "ontology_id": "people", "options": {"provider": "oai"}});
    let id = start(nodes.http(), &body).await?;
    wait_until(common::DEADLINE, "the held mentions call", || async {
        Ok(fake.calls_of("mentions") == 1)
    })
    .await?;
    let pinned: String = sqlx::query_scalar(
        "SELECT data->>'ontology_version' FROM shoal_extraction_events
          WHERE extraction_id = $1 AND kind = 'started'",
    )
    .bind(&id)
    .fetch_one(&nodes.cluster.pool)
    .await?;
    // The file changes; the runner dies; its successor only ever reads the new file.
    std::fs::write(dir.join("people.ttl"), format!("{people}\n# version 2\n"))?;
    nodes.runners[0].kill()?;
    nodes.add_runner().await?;
    fake.release();
    let view = await_status(nodes.http(), &id, &["completed", "failed"], LONG).await?;
    ensure!(view["status"] == "completed", "{view}");
    ensure!(view["result"]["ontology_version"] == pinned, "{view}");
    ensure!(
        !view["result"]["entities"]
            .as_array()
            .context("entities")?
            .is_empty(),
        "{view}"
    );
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
