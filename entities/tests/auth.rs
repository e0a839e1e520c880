//! Gateway auth across processes: a real `shoal gateway` with `[gateway.auth]` on (an
//! HS256 secret and an Ed25519 key from a JWKS file, issuer and audience checked). No
//! token, an expired or a forged one → 401; a valid token for tenant A asking for tenant
//! B's stream, or sending `X-Tenant-Id: B` to a job or an entity route → 403; a valid one →
//! the stream, the job route, the entity route. The operational routes stay open.

mod common;

use anyhow::ensure;
use common::gateway::{Gateway, GatewayOptions, Http};
use common::{Runner, TestCluster};
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
    let cluster = TestCluster::new(16).await?;
    let runner = cluster.start_runner().await?;
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
        (post.clone(), "/entities/counter/c1/get".to_owned()),
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
        (post.clone(), "/entities/counter/c1/get"),
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
