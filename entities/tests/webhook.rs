//! Webhook attempts against a receiver that checks signatures with the Standard Webhooks
//! project's Python implementation (the testkit's [`Receiver`]): what Shoal signs
//! is what an independent verifier accepts, a tampered body is refused, and each status
//! the receiver answers maps to the verdict the job acts on.

use std::time::Duration;

use shoal_entities::webhook::{self, Delivery, Signer, Verdict};
use shoal_testkit::{Receiver, free_port};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OTHER_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

fn delivery<'a>(id: &'a str, url: &'a str, body: &'a str) -> Delivery<'a> {
    Delivery {
        id,
        url,
        body,
        headers: &[],
    }
}

const TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn the_independent_verifier_accepts_what_is_signed_and_refuses_a_tampered_body()
-> anyhow::Result<()> {
    let receiver = Receiver::start(SECRET)?;
    let client = webhook::client(Duration::from_secs(2))?;
    // Rotation: the receiver knows only the older secret, which is second in the list.
    let signer = Signer::new(&[OTHER_SECRET, SECRET])?;
    let url = receiver.url("/ok");
    let body = r#"{"event":"job.succeeded","n":1}"#;
    let attempt =
        webhook::attempt(&client, &signer, &delivery("msg_1", &url, body), TIMEOUT).await?;
    assert_eq!(attempt.verdict, Verdict::Delivered, "{attempt:?}");
    assert_eq!(attempt.status, Some(204));

    // The same signature headers on another body: the verifier must refuse them.
    let headers = signer.headers("msg_2", chrono::Utc::now(), body)?;
    let tampered = client
        .post(&url)
        .headers(headers)
        .body(r#"{"event":"job.succeeded","n":2}"#)
        .send()
        .await?;
    assert_eq!(tampered.status(), 401);

    // A signer that does not know the receiver's secret is refused too.
    let stranger = Signer::new(&[OTHER_SECRET])?;
    let refused =
        webhook::attempt(&client, &stranger, &delivery("msg_3", &url, body), TIMEOUT).await?;
    assert_eq!(refused.status, Some(401));
    assert_eq!(refused.verdict, Verdict::Dead);

    let log = receiver.log().await?;
    let verified: Vec<_> = log
        .iter()
        .map(|e| (e["id"].clone(), e["verified"].clone()))
        .collect();
    assert_eq!(
        verified,
        [
            (serde_json::json!("msg_1"), serde_json::json!(true)),
            (serde_json::json!("msg_2"), serde_json::json!(false)),
            (serde_json::json!("msg_3"), serde_json::json!(false)),
        ]
    );
    assert_eq!(log[0]["body"], body, "the body arrives exactly as signed");
    Ok(())
}

#[tokio::test]
async fn statuses_and_failures_become_verdicts() -> anyhow::Result<()> {
    let receiver = Receiver::start(SECRET)?;
    let client = webhook::client(Duration::from_secs(2))?;
    let signer = Signer::new(&[SECRET])?;
    let body = "{}";
    let cases = [
        ("/status/500", Verdict::Retry { after: None }, Some(500)),
        (
            "/status/429?retry_after=2",
            Verdict::Retry {
                after: Some(Duration::from_secs(2)),
            },
            Some(429),
        ),
        ("/status/408", Verdict::Retry { after: None }, Some(408)),
        ("/status/400", Verdict::Dead, Some(400)),
        ("/status/410", Verdict::Gone, Some(410)),
        ("/status/302", Verdict::Dead, Some(302)),
    ];
    for (path, verdict, status) in cases {
        let url = receiver.url(path);
        let attempt =
            webhook::attempt(&client, &signer, &delivery("m", &url, body), TIMEOUT).await?;
        assert_eq!(
            (attempt.verdict, attempt.status),
            (verdict, status),
            "{path}"
        );
    }

    // A receiver that hangs past the attempt's timeout: retry, no status.
    let url = receiver.url("/hang?seconds=10");
    let hung = webhook::attempt(
        &client,
        &signer,
        &delivery("m", &url, body),
        Duration::from_millis(300),
    )
    .await?;
    assert_eq!(
        (hung.verdict, hung.status),
        (Verdict::Retry { after: None }, None)
    );
    assert!(hung.detail.starts_with("timed out"), "{}", hung.detail);

    // Nobody listening: retry, no status.
    let closed = format!("http://127.0.0.1:{}/ok", free_port()?);
    let refused =
        webhook::attempt(&client, &signer, &delivery("m", &closed, body), TIMEOUT).await?;
    assert_eq!(refused.verdict, Verdict::Retry { after: None });
    assert!(
        refused.detail.starts_with("could not connect"),
        "{}",
        refused.detail
    );
    Ok(())
}
