//! Gateway auth across processes: a real `shoal gateway` with `[gateway.auth]` on (an
//! HS256 secret and an Ed25519 key from a JWKS file, issuer and audience checked). No
//! token, an expired or a forged one → 401; a valid token for tenant A asking for tenant
//! B's stream, or sending `X-Tenant-Id: B` to a job or an entity route → 403; a valid one →
//! the stream, the job route, the entity route. The operational routes stay open.
//!
//! And what a valid token for another tenant cannot do through the generic entity routes:
//! reach a workload's internal types (jobs, job keys, notifications, extractions), another
//! tenant's counters, or an internal message; only the operator scope reaches them.
//!
//! Tenancy with auth on: another tenant's extraction is a 404 on every read and its text
//! runs again as the caller's own (never `cached: true` from the other's result); one
//! tenant holding its cap of streams on a gateway is refused (429) while others open.

mod common;

use anyhow::{Context, ensure};
use common::gateway::{Gateway, GatewayOptions, Http, HttpResponse};
use common::{DEADLINE, Runner, RunnerOptions, TestCluster, wait_until};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!";
const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "shoal-test";
/// An Ed25519 private key (PKCS#8 DER) and its public half as a JWK `x`.
const ED_PRIVATE: [u8; 48] = [
    48, 46, 2, 1, 0, 48, 5, 6, 3, 43, 101, 112, 4, 34, 4, 32, 48, 174, 81, 11, 223, 231, 71, 28,
    117, 13, 122, 183, 6, 77, 7, 166, 102, 88, 156, 20, 68, 217, 202, 198, 131, 135, 60, 59, 163,
    118, 3, 64,
];
const ED_PUBLIC_X: &str = "O61OP65tWb5wtJDNAYc2P1N_8QXYYtf_iwvDZqIGe2k";
/// A 2048-bit RSA key made for this test only (PKCS#1 DER) and its public modulus as a
/// JWK `n` (exponent 65537).
const RSA_PRIVATE: &[u8] = include_bytes!("support/rs256-test-key.der");
const RSA_PUBLIC_N: &str = "uA1uUyIS6F-FjFUwKLDzlbp82RzEaI7OC_MFD-dpTAtw-YHawx8o1Tel5ldfX5GQF-CiweJxu4B0eM7j5L5OQZLRQBjLtH22hLLWnUQIJnr0UtdzKe-ljYYiIie-7dTbi2Q7gsJz2gN5UIyq4wE41gppGNbzwctpcdhMbXyB-f_MrBPuJU1Nlvla2iZfyNo3NDxCc-1SzAS3GBCGjcou8bSQE8Ll-agp-kpES3-kGtCd6qMEr2U52WrEBA1EcbkUToOn7mKbUjJzeShxaO3ema5rCxdR3j7z3u29HpuLoaXLnmPsIDh8JMoGj9cC6tDnuTOTUkn2v0KBOT2iWIRAWw";

fn claims(tenant: &str, exp_offset: i64) -> Value {
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "tenant": tenant, "sub": "user-1",
        "exp": chrono::Utc::now().timestamp() + exp_offset,
    })
}

fn hs256(claims: &Value, secret: &str) -> anyhow::Result<String> {
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes())?,
    )?)
}

fn eddsa(claims: &Value) -> anyhow::Result<String> {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("ed-1".to_owned());
    Ok(jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_ed_der(&ED_PRIVATE),
    )?)
}

fn rs256(claims: &Value) -> anyhow::Result<String> {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rs-1".to_owned());
    Ok(jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_rsa_der(RSA_PRIVATE),
    )?)
}

async fn setup() -> anyhow::Result<(TestCluster, Runner, Gateway)> {
    setup_with(&[]).await
}

/// A runner and a gateway with auth on, both with `extra` in their environment.
async fn setup_with(extra: &[(&str, String)]) -> anyhow::Result<(TestCluster, Runner, Gateway)> {
    let cluster = TestCluster::new(16).await?;
    let extra: Vec<(String, String)> = extra
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let runner = cluster
        .start_runner_with(RunnerOptions {
            env: extra.clone(),
            ..RunnerOptions::default()
        })
        .await?;
    cluster.await_balanced(&[&runner]).await?;
    let jwks = cluster.dir.join("jwks.json");
    std::fs::write(
        &jwks,
        json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": ED_PUBLIC_X, "kid": "ed-1", "use": "sig"},
            {"kty": "RSA", "n": RSA_PUBLIC_N, "e": "AQAB", "kid": "rs-1", "use": "sig", "alg": "RS256"},
        ]})
            .to_string(),
    )?;
    let env = [
        ("SHOAL__GATEWAY__AUTH__ENABLED", "true".to_owned()),
        ("SHOAL__GATEWAY__AUTH__HS256_SECRET", SECRET.to_owned()),
        (
            "SHOAL__GATEWAY__AUTH__JWKS_FILE",
            jwks.display().to_string(),
        ),
        ("SHOAL__GATEWAY__AUTH__ISSUER", ISSUER.to_owned()),
        ("SHOAL__GATEWAY__AUTH__AUDIENCE", AUDIENCE.to_owned()),
    ];
    let gateway = Gateway::start(
        &cluster,
        GatewayOptions {
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .chain(extra)
                .collect(),
            redis_url: None,
            listen: None,
        },
    )
    .await?;
    Ok((cluster, runner, gateway))
}

/// Status and error code of `GET`/`POST path` with `headers` (a stream is not read).
async fn ask(
    http: &Http,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, String)],
) -> anyhow::Result<(StatusCode, String)> {
    let mut request = http.client.request(method.clone(), http.url(path));
    if method == reqwest::Method::POST {
        let body = if path.starts_with("/tenants/") {
            json!({"topic": "t", "data": 1})
        } else {
            json!({})
        };
        request = request.json(&body);
    }
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await?;
    let status = response.status();
    let is_stream = response
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if is_stream {
        return Ok((status, "stream".to_owned()));
    }
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
    Ok((status, code))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_decide_who_reads_which_tenant() -> anyhow::Result<()> {
    let (_cluster, _runner, gateway) = setup().await?;
    let http = &gateway.http;
    let bearer = |token: &str| vec![("authorization", format!("Bearer {token}"))];
    let job = format!("/jobs/{}", uuid::Uuid::now_v7());
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    let routes = [
        (get.clone(), "/tenants/acme/events".to_owned()),
        (post.clone(), "/tenants/acme/events".to_owned()),
        (get.clone(), job.clone()),
        (post.clone(), "/entities/counter/acme:c1/get".to_owned()),
    ];
    let valid = hs256(&claims("acme", 300), SECRET)?;
    let expired = hs256(&claims("acme", -300), SECRET)?;
    let forged = hs256(&claims("acme", 300), "another-secret-of-at-least-32-bytes")?;
    for (method, path) in &routes {
        let (status, code) = ask(http, method.clone(), path, &[]).await?;
        ensure!(
            status == StatusCode::UNAUTHORIZED && code == "missing_token",
            "{method} {path}: {status} {code}"
        );
        for token in [&expired, &forged, &"not.a.jwt".to_owned()] {
            let (status, code) = ask(http, method.clone(), path, &bearer(token)).await?;
            ensure!(
                status == StatusCode::UNAUTHORIZED && code == "invalid_token",
                "{method} {path}: {status} {code}"
            );
        }
    }
    // A valid token for acme: its stream, publishing, the job route (no such job: 404,
    // past auth), the entity route.
    let mut answers = Vec::new();
    for (method, path) in &routes {
        answers.push(ask(http, method.clone(), path, &bearer(&valid)).await?);
    }
    ensure!(
        answers[0] == (StatusCode::OK, "stream".to_owned()),
        "{answers:?}"
    );
    ensure!(answers[1].0 == StatusCode::CREATED, "{answers:?}");
    ensure!(
        answers[2] == (StatusCode::NOT_FOUND, "unknown_job".to_owned()),
        "{answers:?}"
    );
    ensure!(answers[3].0 == StatusCode::OK, "{answers:?}");
    // The same token asking for globex: its stream, publishing there, and a job or entity
    // route told `X-Tenant-Id: globex`.
    for method in [get.clone(), post.clone()] {
        let (status, code) = ask(
            http,
            method.clone(),
            "/tenants/globex/events",
            &bearer(&valid),
        )
        .await?;
        ensure!(
            status == StatusCode::FORBIDDEN && code == "wrong_tenant",
            "{method}: {status} {code}"
        );
    }
    let mut other = bearer(&valid);
    other.push(("x-tenant-id", "globex".to_owned()));
    for (method, path) in [
        (get.clone(), job.as_str()),
        (post.clone(), "/entities/counter/acme:c1/get"),
    ] {
        let (status, code) = ask(http, method.clone(), path, &other).await?;
        ensure!(
            status == StatusCode::FORBIDDEN && code == "wrong_tenant",
            "{method} {path}: {status} {code}"
        );
    }
    // An EdDSA token from the JWKS file works the same; one for another key id does not.
    let ed = eddsa(&claims("acme", 300))?;
    let (status, _) = ask(http, get.clone(), "/tenants/acme/events", &bearer(&ed)).await?;
    ensure!(status == StatusCode::OK, "eddsa: {status}");
    // And an RS256 token from the JWKS file's RSA key; its signature over other claims fails.
    let rs = rs256(&claims("acme", 300))?;
    let (status, _) = ask(http, get.clone(), "/tenants/acme/events", &bearer(&rs)).await?;
    ensure!(status == StatusCode::OK, "rs256: {status}");
    let mut parts: Vec<&str> = rs.split('.').collect();
    let forged_claims = rs256(&claims("globex", 300))?;
    parts[1] = forged_claims.split('.').nth(1).unwrap_or_default();
    let (status, _) = ask(
        http,
        get.clone(),
        "/tenants/globex/events",
        &bearer(&parts.join(".")),
    )
    .await?;
    ensure!(status == StatusCode::UNAUTHORIZED, "rs256 forged: {status}");
    let mut wrong_aud = claims("acme", 300);
    wrong_aud["aud"] = json!("someone-else");
    let (status, _) = ask(
        http,
        get.clone(),
        "/tenants/acme/events",
        &bearer(&eddsa(&wrong_aud)?),
    )
    .await?;
    ensure!(
        status == StatusCode::UNAUTHORIZED,
        "wrong audience: {status}"
    );
    // Operational routes need no token.
    for path in ["/health", "/ready", "/openapi.json"] {
        let (status, _) = ask(http, get.clone(), path, &[]).await?;
        ensure!(status == StatusCode::OK, "{path}: {status}");
    }
    Ok(())
}

/// `POST path` with `body` as `token`'s caller: status, code and body.
async fn post_as(
    http: &Http,
    token: &str,
    path: &str,
    body: &Value,
) -> anyhow::Result<(StatusCode, String, Value)> {
    post_with(http, token, path, body, &[]).await
}

/// Posts `body` as `token` with `extra` headers: the status, the error code, the body.
async fn post_with(
    http: &Http,
    token: &str,
    path: &str,
    body: &Value,
    extra: &[(&str, &str)],
) -> anyhow::Result<(StatusCode, String, Value)> {
    let auth = format!("Bearer {token}");
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    let response = http.post_json(path, body, &headers).await?;
    let json = response.json().unwrap_or(Value::Null);
    let code = json["error"]["code"].as_str().unwrap_or("").to_owned();
    Ok((response.status, code, json))
}

async fn get_as(http: &Http, token: &str, path: &str) -> anyhow::Result<(StatusCode, Value)> {
    let response = http
        .client
        .get(http.url(path))
        .bearer_auth(token)
        .send()
        .await?;
    let status = response.status();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_token_reaches_nothing_through_the_entity_routes() -> anyhow::Result<()> {
    let (_cluster, _runner, gateway) = setup().await?;
    let http = &gateway.http;
    let acme = hs256(&claims("acme", 300), SECRET)?;
    let beta = hs256(&claims("beta", 300), SECRET)?;
    let mut operator_claims = claims("ops", 300);
    operator_claims["scope"] = json!("shoal:operator");
    let operator = hs256(&operator_claims, SECRET)?;

    // acme's own things: a job waiting an hour (so it is still cancellable) with a key,
    // and a counter.
    let run_at = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let (status, _, job) = post_as(
        http,
        &acme,
        "/jobs",
        &json!({"type": "diag.noop", "payload": {}, "key": "invoice-1001", "run_at": run_at}),
    )
    .await?;
    ensure!(status == StatusCode::ACCEPTED, "{status} {job}");
    let job_id = job["id"].as_str().unwrap_or_default().to_owned();
    let (status, _, _) = post_as(
        http,
        &acme,
        "/entities/counter/acme:c1/increment",
        &json!({"by": 5}),
    )
    .await?;
    ensure!(status == StatusCode::OK, "acme's own counter: {status}");

    // beta, through the generic routes: every workload type is unknown to it.
    let attacks = [
        (format!("/entities/job/{job_id}/get"), json!({})),
        (format!("/entities/job/{job_id}/cancel"), json!({})),
        (
            "/entities/job-key/~acme:diag.noop:invoice-1001/claim".to_owned(),
            json!({}),
        ),
        (
            "/entities/job-key/~acme:diag.noop:invoice-1001/release".to_owned(),
            json!({}),
        ),
        (
            "/entities/notification/acme/publish".to_owned(),
            json!({"topic": "invoice", "data": {"pay_to": "IBAN-EVIL"}}),
        ),
        (
            format!("/entities/job/{}/enqueue", uuid::Uuid::now_v7()),
            json!({"type": "diag.noop", "payload": {}, "tenant": "acme"}),
        ),
        (
            "/entities/extraction/ex-0123456789abcdef0123456789abcdef/get".to_owned(),
            json!({}),
        ),
        ("/entities/job-control/x/cancel".to_owned(), json!({})),
        ("/entities/job-cron/x/tick".to_owned(), json!({})),
    ];
    for (path, body) in &attacks {
        let (status, code, answer) = post_as(http, &beta, path, body).await?;
        ensure!(
            status == StatusCode::NOT_FOUND && code == "unknown_entity_type",
            "beta {path}: {status} {answer}"
        );
    }
    for path in [
        format!("/entities/job/{job_id}"),
        "/entities/notification/acme".to_owned(),
    ] {
        let (status, answer) = get_as(http, &beta, &path).await?;
        ensure!(
            status == StatusCode::NOT_FOUND,
            "beta explains {path}: {status} {answer}"
        );
    }
    // acme's counter is out of beta's scope, for sending and explaining alike.
    for (path, body) in [
        ("/entities/counter/acme:c1/increment", json!({"by": 1000})),
        ("/entities/counter/acme/get", json!({})),
        ("/entities/counter/acme-c1/get", json!({})),
    ] {
        let (status, code, answer) = post_as(http, &beta, path, &body).await?;
        ensure!(
            status == StatusCode::FORBIDDEN && code == "outside_tenant",
            "beta {path}: {status} {answer}"
        );
    }
    let (status, _) = get_as(http, &beta, "/entities/counter/acme:c1").await?;
    ensure!(
        status == StatusCode::FORBIDDEN,
        "beta explains acme's counter: {status}"
    );
    let (status, _, own) =
        post_as(http, &beta, "/entities/counter/beta:c1/get", &json!({})).await?;
    ensure!(
        status == StatusCode::OK,
        "beta's own counter: {status} {own}"
    );

    // Nothing of acme's changed: the job still waits, its key still holds, the count is 5.
    let (status, record) = get_as(http, &acme, &format!("/jobs/{job_id}")).await?;
    ensure!(
        status == StatusCode::OK && record["status"] == "scheduled",
        "acme's job: {status} {record}"
    );
    let (status, _, again) = post_as(
        http,
        &acme,
        "/jobs",
        &json!({"type": "diag.noop", "payload": {}, "key": "invoice-1001", "run_at": run_at}),
    )
    .await?;
    ensure!(
        status == StatusCode::ACCEPTED && again["id"] == job_id.as_str(),
        "the key still names acme's job: {status} {again}"
    );
    let (_, _, count) = post_as(http, &acme, "/entities/counter/acme:c1/get", &json!({})).await?;
    ensure!(count["reply"]["count"] == 5, "acme's count: {count}");

    // An operator reaches the internal types (here: explaining acme's job entity).
    let (status, explain) = get_as(http, &operator, &format!("/entities/job/{job_id}")).await?;
    ensure!(status == StatusCode::OK, "operator: {status} {explain}");

    // The document lists no internal type.
    let doc: Value = http.get("/openapi.json").await?.json()?;
    let paths: Vec<&String> = doc["paths"]
        .as_object()
        .map(|p| p.keys().collect())
        .unwrap_or_default();
    for hidden in [
        "/entities/job/",
        "/entities/job-key/",
        "/entities/notification/",
        "/entities/extraction/",
        "/entities/job-control/",
        "/entities/job-cron/",
    ] {
        ensure!(
            !paths.iter().any(|p| p.starts_with(hidden)),
            "{hidden} listed: {paths:?}"
        );
    }
    ensure!(
        paths.iter().any(|p| p.starts_with("/entities/counter/")),
        "the counter is public: {paths:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_missing_a_configured_claim_or_not_yet_valid_are_refused() -> anyhow::Result<()> {
    let (_cluster, _runner, gateway) = setup().await?;
    let http = &gateway.http;
    let mut tokens = Vec::new();
    for missing in ["iss", "aud"] {
        let mut without = claims("acme", 300);
        without.as_object_mut().map(|c| c.remove(missing));
        tokens.push((format!("without {missing}"), hs256(&without, SECRET)?));
    }
    let mut early = claims("acme", 3 * 365 * 24 * 3600);
    early["nbf"] = json!(chrono::Utc::now().timestamp() + 365 * 24 * 3600);
    tokens.push(("nbf a year ahead".to_owned(), hs256(&early, SECRET)?));
    for (what, token) in &tokens {
        let response = http
            .client
            .get(http.url("/tenants/acme/events"))
            .bearer_auth(token)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        ensure!(
            status == StatusCode::UNAUTHORIZED
                && body["error"]["code"] == "invalid_token"
                && body["error"]["message"] == "the bearer token is not valid for this gateway",
            "{what}: {status} {body}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_port_needs_the_cluster_secret_and_refuses_the_built_in_one()
-> anyhow::Result<()> {
    let cluster = TestCluster::new(4).await?;
    let runner = cluster.start_runner().await?;
    let http = reqwest::Client::new();
    for path in ["/status", "/metrics"] {
        let url = format!("http://{}{path}", runner.addr);
        let bare = http.get(&url).send().await?.status();
        ensure!(
            bare == StatusCode::UNAUTHORIZED,
            "{path} without the secret: {bare}"
        );
        let wrong = http
            .get(&url)
            .header("x-shoal-secret", "not-the-secret")
            .send()
            .await?
            .status();
        ensure!(
            wrong == StatusCode::UNAUTHORIZED,
            "{path} with a wrong one: {wrong}"
        );
        let right = http
            .get(&url)
            .bearer_auth(shoal_testkit::process::CLUSTER_SECRET)
            .send()
            .await?
            .status();
        ensure!(right == StatusCode::OK, "{path} with the secret: {right}");
    }
    let health = http
        .get(format!("http://{}/health", runner.addr))
        .send()
        .await?
        .status();
    ensure!(health == StatusCode::OK, "/health stays open: {health}");
    // Started on their own with the secret everyone can read in the source: refused.
    let port = shoal_testkit::free_port()?.to_string();
    let listen = format!("127.0.0.1:{port}");
    for args in [
        vec![
            "runner",
            "--database-url",
            cluster.db.url.as_str(),
            "--listen",
            listen.as_str(),
        ],
        vec![
            "gateway",
            "--database-url",
            cluster.db.url.as_str(),
            "--listen",
            listen.as_str(),
        ],
    ] {
        let (status, stderr) = common::run_shoal_in(
            &cluster.dir,
            &args,
            &[("SHOAL__CLUSTER__SECRET", shoal::config::DEFAULT_SECRET)],
        )
        .await?;
        ensure!(
            !status.success() && stderr.contains("cluster.secret is the built-in default"),
            "{args:?}: {status} {stderr}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnostic_types_are_offered_only_when_enabled() -> anyhow::Result<()> {
    let cluster = TestCluster::new(4).await?;
    let _runner = cluster.start_runner().await?;
    let gateway = Gateway::start(
        &cluster,
        GatewayOptions {
            env: vec![("SHOAL__DIAGNOSTICS__ENABLED".to_owned(), "false".to_owned())],
            redis_url: None,
            listen: None,
        },
    )
    .await?;
    let http = &gateway.http;
    let probe = http
        .post_json("/entities/probe/p1/echo", &json!({"value": 1}), &[])
        .await?;
    ensure!(
        probe.status == StatusCode::NOT_FOUND,
        "probe: {} {}",
        probe.status,
        probe.text()
    );
    let job = http
        .post_json("/jobs", &json!({"type": "diag.noop", "payload": {}}), &[])
        .await?;
    ensure!(
        job.status == StatusCode::BAD_REQUEST,
        "diag.noop: {} {}",
        job.status,
        job.text()
    );
    let doc: Value = http.get("/openapi.json").await?.json()?;
    let text = doc.to_string();
    ensure!(
        !text.contains("/entities/probe/") && !text.contains("diag.noop"),
        "the document offers a diagnostic type"
    );
    let counter = http
        .post_json("/entities/counter/c1/get", &json!({}), &[])
        .await?;
    ensure!(
        counter.status == StatusCode::OK,
        "counter: {}",
        counter.status
    );
    Ok(())
}

/// `Authorization: Bearer` with a valid token for `tenant`.
fn bearer_of(tenant: &str) -> anyhow::Result<String> {
    Ok(format!("Bearer {}", hs256(&claims(tenant, 300), SECRET)?))
}

/// `method path` as `tenant` (with a JSON body for a `POST`), the whole answer read.
async fn as_tenant(
    http: &Http,
    tenant: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<HttpResponse> {
    let mut request = http
        .client
        .request(method, http.url(path))
        .header("authorization", bearer_of(tenant)?);
    if let Some(body) = body {
        request = request.json(body);
    }
    http.send(request).await
}

/// `POST /extractions?wait=true` of `text` as `tenant`: 200 and the view.
async fn extract(http: &Http, tenant: &str, text: &str) -> anyhow::Result<Value> {
    let body = json!({"text": text, "ontology_id": "foaf"});
    let post = reqwest::Method::POST;
    let answer = as_tenant(http, tenant, post, "/extractions?wait=true", Some(&body)).await?;
    ensure!(
        answer.status == StatusCode::OK,
        "{tenant}: {} {}",
        answer.status,
        answer.text()
    );
    answer.json()
}

/// Redis for the runner and the gateway, under a prefix of this test's own.
fn redis_env() -> Vec<(&'static str, String)> {
    vec![
        ("SHOAL__REDIS__URL", shoal_testkit::redis::redis_url()),
        (
            "SHOAL__REDIS__KEY_PREFIX",
            format!("shoal-test:auth-{}", uuid::Uuid::now_v7()),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_extraction_is_a_404_and_its_text_runs_as_the_callers_own()
-> anyhow::Result<()> {
    let mut extra = redis_env();
    // A short handle, so a finished extraction is forgotten and answered from the
    // durable copy (whose row carries the tenant) within the test.
    extra.push(("SHOAL__EXTRACTION__KEEP_HANDLE", "1s".to_owned()));
    let (_cluster, _runner, gateway) = setup_with(&extra).await?;
    let http = &gateway.http;
    let get = reqwest::Method::GET;
    let text = "Ada Lovelace met Charles Babbage at the University of London.";

    let acme = extract(http, "acme", text).await?;
    ensure!(
        acme["status"] == "completed" && acme["cached"] == false,
        "{acme}"
    );
    let acme_id = acme["id"].as_str().context("an id")?.to_owned();
    let again = extract(http, "acme", text).await?;
    ensure!(
        again["id"] == acme_id.as_str() && again["cached"] == true,
        "acme's own repeat is a cache hit: {again}"
    );

    // Beta holding acme's id learns nothing: every read is the 404 of an unknown id.
    let unknown = format!("ex-{}", "0".repeat(32));
    for path in [
        format!("/extractions/{acme_id}"),
        format!("/extractions/{acme_id}/events"),
    ] {
        let answer = as_tenant(http, "beta", get.clone(), &path, None).await?;
        let body = answer.text();
        ensure!(
            answer.status == StatusCode::NOT_FOUND
                && answer.error()?.0 == "unknown_extraction"
                && !body.contains("Lovelace")
                && !body.contains("foaf"),
            "beta {path}: {} {body}",
            answer.status
        );
        let control = as_tenant(
            http,
            "beta",
            get.clone(),
            &path.replace(&acme_id, &unknown),
            None,
        )
        .await?;
        ensure!(
            control.text().replace(&unknown, &acme_id) == body,
            "an unknown id answers the same: {}",
            control.text()
        );
    }
    let jsonld = http
        .send(
            http.client
                .get(http.url(&format!("/extractions/{acme_id}")))
                .header("authorization", bearer_of("beta")?)
                .header("accept", "application/ld+json"),
        )
        .await?;
    ensure!(jsonld.status == StatusCode::NOT_FOUND, "{}", jsonld.text());

    // Beta's same text is beta's own extraction, run for beta.
    let beta = extract(http, "beta", text).await?;
    let beta_id = beta["id"].as_str().context("an id")?.to_owned();
    ensure!(
        beta_id != acme_id && beta["cached"] == false && beta["dedup_hits"] == 0,
        "beta's run is its own: {beta}"
    );
    ensure!(
        beta["result"]["entities"] == acme["result"]["entities"],
        "the same extraction, run again: {beta}"
    );
    let answer = as_tenant(
        http,
        "acme",
        get.clone(),
        &format!("/extractions/{beta_id}"),
        None,
    )
    .await?;
    ensure!(answer.status == StatusCode::NOT_FOUND, "{}", answer.text());
    // Acme's own still answers acme, its events included.
    let again = extract(http, "acme", text).await?;
    ensure!(
        again["id"] == acme_id.as_str() && again["cached"] == true,
        "{again}"
    );
    let events = as_tenant(
        http,
        "acme",
        get.clone(),
        &format!("/extractions/{acme_id}/events"),
        None,
    )
    .await?;
    ensure!(
        events.status == StatusCode::OK && events.text().contains("event: complete"),
        "{} {}",
        events.status,
        events.text()
    );

    // Forgotten after keep-handle, acme's answers from the durable copy — and still not to
    // beta.
    let path = format!("/extractions/{acme_id}");
    wait_until(
        DEADLINE,
        "acme's extraction answered from its durable copy",
        || async {
            let view = as_tenant(http, "acme", get.clone(), &path, None)
                .await?
                .json()?;
            Ok(view["cached"] == true)
        },
    )
    .await?;
    let answer = as_tenant(http, "beta", get.clone(), &path, None).await?;
    ensure!(
        answer.status == StatusCode::NOT_FOUND && answer.error()?.0 == "unknown_extraction",
        "{} {}",
        answer.status,
        answer.text()
    );
    // A token naming neither cannot turn itself into acme by header (the gateway's 403).
    let answer = http
        .send(
            http.client
                .post(http.url("/extractions"))
                .header("authorization", bearer_of("beta")?)
                .header("x-tenant-id", "acme")
                .json(&json!({"text": text, "ontology_id": "foaf"})),
        )
        .await?;
    ensure!(answer.status == StatusCode::FORBIDDEN, "{}", answer.text());
    Ok(())
}

/// Opens `path` as `tenant` and holds the stream: `Ok(response)` once it answers 200 with
/// `text/event-stream`, or the answer read whole otherwise.
async fn open_stream(
    client: &reqwest::Client,
    http: &Http,
    tenant: &str,
    path: &str,
) -> anyhow::Result<Result<reqwest::Response, HttpResponse>> {
    let response = client
        .get(http.url(path))
        .header("authorization", bearer_of(tenant)?)
        .send()
        .await?;
    let is_stream = response
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if response.status() == StatusCode::OK && is_stream {
        return Ok(Ok(response));
    }
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await?.to_vec();
    Ok(Err(HttpResponse {
        status,
        headers,
        body,
    }))
}

fn is_tenant_limit(answer: &HttpResponse) -> anyhow::Result<bool> {
    Ok(answer.status == StatusCode::TOO_MANY_REQUESTS
        && answer.error()?.0 == "tenant_stream_limit"
        && answer.text().contains("max-subscribers-per-tenant")
        && answer.headers.contains_key("retry-after"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_at_its_cap_of_streams_leaves_the_others_room() -> anyhow::Result<()> {
    let extra = [
        ("SHOAL__NOTIFICATIONS__MAX_SUBSCRIBERS", "4".to_owned()),
        (
            "SHOAL__NOTIFICATIONS__MAX_SUBSCRIBERS_PER_TENANT",
            "2".to_owned(),
        ),
        // A closed stream's place comes back at its next write.
        ("SHOAL__NOTIFICATIONS__HEARTBEAT", "200ms".to_owned()),
    ];
    let (_cluster, _runner, gateway) = setup_with(&extra).await?;
    let http = &gateway.http;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let acme_id = extract(http, "acme", "Ada Lovelace met Charles Babbage.").await?["id"]
        .as_str()
        .context("an id")?
        .to_owned();
    let beta_id = extract(http, "beta", "Alan Turing met Alonzo Church.").await?["id"]
        .as_str()
        .context("an id")?
        .to_owned();

    // Acme takes its two places.
    let mut acme = Vec::new();
    for _ in 0..2 {
        match open_stream(&client, http, "acme", "/tenants/acme/events").await? {
            Ok(stream) => acme.push(stream),
            Err(answer) => anyhow::bail!("acme's stream: {} {}", answer.status, answer.text()),
        }
    }
    // Its third stream of any kind is refused with its own limit named.
    for path in [
        "/tenants/acme/events".to_owned(),
        format!("/extractions/{acme_id}/events"),
    ] {
        let refused = open_stream(&client, http, "acme", &path).await?;
        let answer = refused.err().context("acme's third stream opened")?;
        ensure!(
            is_tenant_limit(&answer)?,
            "{path}: {} {:?} {}",
            answer.status,
            answer.headers.get("retry-after"),
            answer.text()
        );
    }
    // A wait is a stream too: acme's `?wait=true` does not wait (202, follow status_url).
    let body = json!({"text": "Grace Hopper met John von Neumann.", "ontology_id": "foaf"});
    let post = reqwest::Method::POST;
    let waited = as_tenant(
        http,
        "acme",
        post.clone(),
        "/extractions?wait=true",
        Some(&body),
    )
    .await?;
    ensure!(
        waited.status == StatusCode::ACCEPTED,
        "{} {}",
        waited.status,
        waited.text()
    );

    // Beta's streams still open: its extraction's events (read to their end), a stream of
    // its own; then gamma's, once the events' place is back.
    let events = as_tenant(
        http,
        "beta",
        reqwest::Method::GET,
        &format!("/extractions/{beta_id}/events"),
        None,
    )
    .await?;
    ensure!(
        events.status == StatusCode::OK && events.text().contains("event: complete"),
        "{} {}",
        events.status,
        events.text()
    );
    let refused = |answer: &HttpResponse| -> anyhow::Result<bool> {
        Ok(is_tenant_limit(answer)? || answer.error()?.0 == "too_many_subscribers")
    };
    let beta = open_when(&client, http, "beta", "/tenants/beta/events", refused).await?;
    let gamma = open_when(&client, http, "gamma", "/tenants/gamma/events", refused).await?;
    // The gateway's own cap (4: acme's two, beta's, gamma's) still holds for everyone.
    let full = open_stream(&client, http, "delta", "/tenants/delta/events").await?;
    let answer = full
        .err()
        .context("delta's stream opened past the gateway's cap")?;
    ensure!(
        answer.status == StatusCode::SERVICE_UNAVAILABLE
            && answer.error()?.0 == "too_many_subscribers",
        "{} {}",
        answer.status,
        answer.text()
    );
    // Acme closing a stream gives its place back to acme.
    acme.pop();
    let again = open_when(
        &client,
        http,
        "acme",
        "/tenants/acme/events",
        is_tenant_limit,
    )
    .await?;
    drop((acme, again, beta, gamma));
    Ok(())
}

/// Opens `path` as `tenant` once it is no longer refused as `refused` says (a closed
/// stream's place comes back when the gateway notices); another answer is reported if it
/// lasts to the deadline.
async fn open_when(
    client: &reqwest::Client,
    http: &Http,
    tenant: &str,
    path: &str,
    refused: impl Fn(&HttpResponse) -> anyhow::Result<bool>,
) -> anyhow::Result<reqwest::Response> {
    let opened = std::sync::Mutex::new(None);
    let what = format!("{tenant}'s stream {path} opens");
    wait_until(DEADLINE, &what, || async {
        match open_stream(client, http, tenant, path).await? {
            Ok(stream) => {
                *opened.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
                Ok(true)
            }
            Err(answer) if refused(&answer)? => Ok(false),
            Err(answer) => anyhow::bail!("{what}: {} {}", answer.status, answer.text()),
        }
    })
    .await?;
    opened
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .context("no stream")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_may_opt_into_one_shared_extraction_cache() -> anyhow::Result<()> {
    let mut extra = redis_env();
    extra.push(("SHOAL__EXTRACTION__SHARED_CACHE", "true".to_owned()));
    let (_cluster, _runner, gateway) = setup_with(&extra).await?;
    let http = &gateway.http;
    let text = "Ada Lovelace met Charles Babbage at the University of London.";
    let acme = extract(http, "acme", text).await?;
    ensure!(acme["cached"] == false, "{acme}");
    let id = acme["id"].as_str().context("an id")?;
    // One extraction per inputs across tenants: beta is answered from acme's result.
    let beta = extract(http, "beta", text).await?;
    ensure!(beta["id"] == id && beta["cached"] == true, "{beta}");
    let answer = as_tenant(
        http,
        "beta",
        reqwest::Method::GET,
        &format!("/extractions/{id}"),
        None,
    )
    .await?;
    ensure!(answer.status == StatusCode::OK, "{}", answer.text());
    Ok(())
}

/// Posts `body` as `token` with `key` as the `Idempotency-Key`.
async fn post_keyed(
    http: &Http,
    token: &str,
    path: &str,
    body: &Value,
    key: &str,
) -> anyhow::Result<(StatusCode, String, Value)> {
    post_with(http, token, path, body, &[("idempotency-key", key)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_takes_keys_by_one_rule_each_in_a_space_of_its_own() -> anyhow::Result<()> {
    let (_cluster, _runner, gateway) = setup().await?;
    let http = &gateway.http;
    let acme = hs256(&claims("acme", 300), SECRET)?;
    let mut operator_claims = claims("ops", 300);
    operator_claims["scope"] = json!("shoal:operator");
    let operator = hs256(&operator_claims, SECRET)?;

    // The rule: 1–255 printable characters, an empty key refused (not taken as no key).
    let run_at = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let job =
        |n: usize| json!({"type": "diag.noop", "payload": {}, "run_at": run_at, "priority": n});
    let routes: [(&str, Value, StatusCode); 3] = [
        (
            "/entities/counter/acme:keyed/increment",
            json!({}),
            StatusCode::OK,
        ),
        (
            "/tenants/acme/events",
            json!({"topic": "t", "data": 1}),
            StatusCode::CREATED,
        ),
        ("/jobs", job(1), StatusCode::ACCEPTED),
    ];
    for (path, body, ok) in &routes {
        for bad in [String::new(), "k".repeat(256)] {
            let (status, code, json) = post_keyed(http, &acme, path, body, &bad).await?;
            ensure!(
                status == StatusCode::BAD_REQUEST && code == "bad_idempotency_key",
                "{path} with a key of {} characters: {status} {json}",
                bad.len()
            );
        }
        let longest = "k".repeat(255);
        let (status, _, json) = post_keyed(http, &acme, path, body, &longest).await?;
        ensure!(status == *ok, "{path} with 255 characters: {status} {json}");
    }
    // A job's key in the body follows the same rule.
    for (key, ok) in [
        ("", false),
        (&*"j".repeat(256), false),
        (&*"j".repeat(255), true),
    ] {
        let mut body = job(2);
        body["key"] = json!(key);
        let (status, code, json) = post_as(http, &acme, "/jobs", &body).await?;
        ensure!(
            (status == StatusCode::ACCEPTED) == ok && (ok || code == "bad_idempotency_key"),
            "body key of {} characters: {status} {json}",
            key.len()
        );
    }

    // Spaces: a key first used on the entity route (a publish its handler refuses) does not
    // answer a later events-route publish with that refusal…
    let (status, _, json) = post_keyed(
        http,
        &operator,
        "/entities/notification/acme/publish",
        &json!({"topic": "no spaces allowed", "data": 1}),
        "shared-1",
    )
    .await?;
    ensure!(
        status == StatusCode::UNPROCESSABLE_ENTITY,
        "{status} {json}"
    );
    let (status, _, published) = post_keyed(
        http,
        &acme,
        "/tenants/acme/events",
        &json!({"topic": "t", "data": 2}),
        "shared-1",
    )
    .await?;
    ensure!(
        status == StatusCode::CREATED,
        "events route: {status} {published}"
    );
    // …and an events-route key does not answer the entity route with that event.
    let (status, _, first) = post_keyed(
        http,
        &acme,
        "/tenants/acme/events",
        &json!({"topic": "t", "data": 3}),
        "shared-2",
    )
    .await?;
    ensure!(status == StatusCode::CREATED, "{status} {first}");
    let (status, _, second) = post_keyed(
        http,
        &operator,
        "/entities/notification/acme/publish",
        &json!({"topic": "t", "data": 4}),
        "shared-2",
    )
    .await?;
    ensure!(status == StatusCode::OK, "{status} {second}");
    let first_seq = first["seq"].as_u64().context("seq")?;
    ensure!(
        second["reply"]["seq"].as_u64() == Some(first_seq + 1),
        "a new event after {first_seq}: {second}"
    );
    // Within one route a key still names one send.
    let (_, _, again) = post_keyed(
        http,
        &acme,
        "/tenants/acme/events",
        &json!({"topic": "t", "data": 3}),
        "shared-2",
    )
    .await?;
    ensure!(again["seq"] == first["seq"], "{again} vs {first}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_token_opens_only_its_tenants_stream_and_only_if_short_lived() -> anyhow::Result<()>
{
    let (_cluster, _runner, gateway) = setup().await?;
    let http = &gateway.http;
    let short = hs256(&claims("acme", 60), SECRET)?;
    let long = hs256(&claims("acme", 3600), SECRET)?;
    let get = |path: String| async move {
        let response = http.client.get(http.url(&path)).send().await?;
        let status = response.status();
        // A stream's body never ends: only its head is read.
        let code = if status == StatusCode::OK {
            String::new()
        } else {
            let body: Value = response.json().await.unwrap_or(Value::Null);
            body["error"]["code"].as_str().unwrap_or("").to_owned()
        };
        anyhow::Ok((status, code))
    };
    let cases = [
        // Its own stream, with topics kept after the token is taken out.
        (
            format!("/tenants/acme/events?topics=a&access_token={short}"),
            StatusCode::OK,
            "",
        ),
        // Another tenant's stream: the token's tenant decides.
        (
            format!("/tenants/beta/events?access_token={short}"),
            StatusCode::FORBIDDEN,
            "wrong_tenant",
        ),
        // A token that outlives `query-token-max-lifetime`.
        (
            format!("/tenants/acme/events?access_token={long}"),
            StatusCode::UNAUTHORIZED,
            "long_lived_query_token",
        ),
        // Not a stream route: the query is no place for a token there.
        (
            format!("/jobs?access_token={short}"),
            StatusCode::UNAUTHORIZED,
            "missing_token",
        ),
        // A forged or huge value is one more invalid token.
        (
            format!("/tenants/acme/events?access_token={}", "x".repeat(16_000)),
            StatusCode::UNAUTHORIZED,
            "invalid_token",
        ),
    ];
    for (path, status, code) in cases {
        let (got, got_code) = get(path.clone()).await?;
        ensure!(
            got == status && got_code == code,
            "{}…: {got} {got_code}",
            &path[..path.len().min(60)]
        );
    }
    Ok(())
}
