//! The job system across real processes: runners and a gateway over Postgres, jobs driven
//! through `POST /jobs`, `GET /jobs/{id}`, retry and cancel, with the diagnostic job types
//! (`diag.flaky`, `diag.sleep`, `diag.noop`).

mod common;

use std::time::Duration;

use anyhow::{Context, ensure};
use chrono::{DateTime, Utc};
use common::gateway::{Gateway, GatewayOptions, Http};
use common::{DEADLINE, Runner, TestCluster, wait_until};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A cluster of `runners` runners and a gateway.
async fn cluster(runners: usize) -> anyhow::Result<(TestCluster, Vec<Runner>, Gateway)> {
    let (cluster, runners) = TestCluster::balanced(16, runners).await?;
    let gateway = Gateway::start(&cluster, GatewayOptions::default()).await?;
    Ok((cluster, runners, gateway))
}

/// The sum over `runners` of the samples of `name` whose labels include `labels`.
async fn metric_sum<const N: usize>(
    runners: &[Runner],
    name: &str,
    labels: [(&str, &str); N],
) -> anyhow::Result<f64> {
    let mut sum = 0.0;
    for runner in runners {
        let text = reqwest::Client::new()
            .get(format!("http://{}/metrics", runner.addr))
            .header("x-shoal-secret", shoal_testkit::process::CLUSTER_SECRET)
            .send()
            .await?
            .text()
            .await?;
        sum += text
            .lines()
            .filter(|l| {
                l.starts_with(&format!("{name}{{"))
                    && labels
                        .iter()
                        .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    Ok(sum)
}

/// Enqueues a job; returns its id.
async fn enqueue(http: &Http, body: Value) -> anyhow::Result<String> {
    let response = http.post_json("/jobs", &body, &[]).await?;
    ensure!(
        response.status == StatusCode::ACCEPTED,
        "enqueue {body}: {} {}",
        response.status,
        response.text()
    );
    let json = response.json()?;
    let id = json["id"].as_str().context("an id")?.to_owned();
    ensure!(json["status_url"] == format!("/jobs/{id}"), "{json}");
    Ok(id)
}

async fn show(http: &Http, id: &str) -> anyhow::Result<Value> {
    let response = http.get(&format!("/jobs/{id}")).await?;
    ensure!(
        response.status == StatusCode::OK,
        "{} {}",
        response.status,
        response.text()
    );
    response.json()
}

/// Waits until the job's status is `status`; returns the job.
async fn await_status(http: &Http, id: &str, status: &str) -> anyhow::Result<Value> {
    let last = std::sync::Mutex::new(Value::Null);
    let waited = wait_until(DEADLINE, &format!("job {id} {status}"), || async {
        let job = show(http, id).await?;
        let done = job["status"] == status;
        *last.lock().unwrap_or_else(|e| e.into_inner()) = job;
        Ok(done)
    })
    .await;
    let job = last.into_inner().unwrap_or_else(|e| e.into_inner());
    waited.with_context(|| format!("last seen: {job}"))?;
    Ok(job)
}

fn time(value: &Value) -> anyhow::Result<DateTime<Utc>> {
    let text = value
        .as_str()
        .with_context(|| format!("a time, got {value}"))?;
    Ok(text.parse()?)
}

fn outcomes(job: &Value) -> Vec<String> {
    job["attempts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| x["outcome"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The wait between the end of attempt `i` and the start of attempt `i + 1`.
fn gap(job: &Value, i: usize) -> anyhow::Result<Duration> {
    let ended = time(&job["attempts"][i]["ended_at"])?;
    let started = time(&job["attempts"][i + 1]["started_at"])?;
    Ok((started - ended).to_std()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failing_twice_succeeds_on_the_third_attempt_after_backoff() -> anyhow::Result<()> {
    let (_cluster, _runners, gateway) = cluster(2).await?;
    let http = &gateway.http;
    let id = enqueue(
        http,
        json!({"type": "diag.flaky", "payload": {"fail_times": 2}}),
    )
    .await?;
    let job = await_status(http, &id, "succeeded").await?;
    ensure!(outcomes(&job) == ["failed", "failed", "succeeded"], "{job}");
    ensure!(job["result"] == json!({"succeeded_on_attempt": 3}), "{job}");
    ensure!(job["attempts"][0]["error"] == "failing attempt 1", "{job}");
    // diag.flaky: backoff 1 s doubling, jitter up to +50 %; the due timer fires on time,
    // so a little slack for the delivery.
    let slack = Duration::from_millis(500);
    for (i, first) in [(0, 1000u64), (1, 2000)] {
        let gap = gap(&job, i)?;
        let low = Duration::from_millis(first);
        let high = Duration::from_millis(first * 3 / 2) + slack;
        ensure!(
            gap >= low && gap <= high,
            "gap {i}: {gap:?} not in [{low:?}, {high:?}]: {job}"
        );
    }
    ensure!(
        job["progress"]["percent"] == 50,
        "the last progress is kept: {job}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_out_of_attempts_is_dead_and_a_retry_runs_it_to_success() -> anyhow::Result<()> {
    let (_cluster, _runners, gateway) = cluster(2).await?;
    let http = &gateway.http;
    // The job's own backoff (200 ms) over the type's (1 s).
    let body = json!({"type": "diag.flaky", "payload": {"fail_times": 3}, "max_attempts": 2,
                      "backoff": {"first_ms": 200, "max_ms": 200}});
    let id = enqueue(http, body).await?;
    let dead = await_status(http, &id, "dead").await?;
    ensure!(outcomes(&dead) == ["failed", "failed"], "{dead}");
    let waited = gap(&dead, 0)?;
    ensure!(
        waited >= Duration::from_millis(200) && waited < Duration::from_millis(900),
        "the job's own backoff: waited {waited:?}"
    );
    ensure!(dead["waiting"] == "failing attempt 2", "{dead}");

    // A job that is not dead cannot be retried; a dead one gets a fresh budget of 2.
    let retried = http
        .post_json(&format!("/jobs/{id}/retry"), &json!({}), &[])
        .await?;
    ensure!(retried.status == StatusCode::ACCEPTED, "{}", retried.text());
    let done = await_status(http, &id, "succeeded").await?;
    ensure!(
        outcomes(&done) == ["failed", "failed", "failed", "succeeded"],
        "{done}"
    );
    let again = http
        .post_json(&format!("/jobs/{id}/retry"), &json!({}), &[])
        .await?;
    ensure!(
        again.status == StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        again.text()
    );
    ensure!(again.error()?.0 == "not_retryable", "{}", again.text());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_due_in_two_seconds_starts_on_time() -> anyhow::Result<()> {
    let (_cluster, _runners, gateway) = cluster(2).await?;
    let http = &gateway.http;
    let run_at = Utc::now() + chrono::Duration::seconds(2);
    let body = json!({"type": "diag.noop", "payload": {}, "run_at": run_at});
    let id = enqueue(http, body).await?;
    let scheduled = show(http, &id).await?;
    ensure!(scheduled["status"] == "scheduled", "{scheduled}");
    let job = await_status(http, &id, "succeeded").await?;
    let started = time(&job["attempts"][0]["started_at"])?;
    ensure!(started >= run_at, "started {started} before {run_at}");
    let late = (started - run_at).to_std()?;
    ensure!(late < Duration::from_secs(1), "started {late:?} late");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_cancels_a_sleeping_handler_which_observes_it() -> anyhow::Result<()> {
    let (_cluster, _runners, gateway) = cluster(2).await?;
    let http = &gateway.http;
    let body = json!({"type": "diag.sleep", "payload": {"ms": 60000}, "timeout_ms": 500});
    let id = enqueue(http, body).await?;
    let job = await_status(http, &id, "dead").await?;
    ensure!(outcomes(&job) == ["timed_out"], "{job}");
    let attempt = &job["attempts"][0];
    ensure!(
        attempt["notes"] == json!([{"observed": "cancelled"}]),
        "{job}"
    );
    let ran = (time(&attempt["ended_at"])? - time(&attempt["started_at"])?).to_std()?;
    ensure!(
        ran >= Duration::from_millis(500) && ran < Duration::from_secs(3),
        "ran {ran:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_attempt_is_retried_after_its_backoff() -> anyhow::Result<()> {
    let (_cluster, runners, gateway) = cluster(2).await?;
    let http = &gateway.http;
    let body = json!({
        "type": "diag.sleep",
        "payload": {"ms": 60000},
        "timeout_ms": 300,
        "max_attempts": 3,
        "backoff": {"first_ms": 400, "max_ms": 400},
    });
    let id = enqueue(http, body).await?;
    let job = await_status(http, &id, "dead").await?;
    ensure!(
        outcomes(&job) == ["timed_out", "timed_out", "timed_out"],
        "{job}"
    );
    let attempts = job["attempts"].as_array().context("attempts")?;
    let mut waited = Duration::ZERO;
    for pair in attempts.windows(2) {
        let gap = (time(&pair[1]["started_at"])? - time(&pair[0]["ended_at"])?).to_std()?;
        // The job's own backoff (400 ms, jitter adds up to half), not its type's (1 s, 2 s).
        ensure!(
            gap >= Duration::from_millis(400),
            "retried after {gap:?}: {job}"
        );
        waited += gap;
    }
    ensure!(
        waited < Duration::from_millis(2500),
        "waited {waited:?}: {job}"
    );
    // What an operator alerts on: attempts by outcome and duration, queue lag, dead letters.
    let sleep = ("type", "diag.sleep");
    let timed_out = metric_sum(
        &runners,
        "shoal_job_attempts_total",
        [sleep, ("outcome", "timed_out")],
    )
    .await?;
    ensure!(timed_out == 3.0, "timed-out attempts counted {timed_out}");
    let timed = metric_sum(&runners, "shoal_job_attempt_seconds_count", [sleep]).await?;
    ensure!(timed == 3.0, "attempt durations recorded {timed}");
    let lag = metric_sum(&runners, "shoal_job_queue_lag_seconds_count", [sleep]).await?;
    ensure!(lag == 3.0, "queue lags recorded {lag}");
    let dead = metric_sum(
        &runners,
        "shoal_jobs_finished_total",
        [sleep, ("status", "dead")],
    )
    .await?;
    ensure!(dead == 1.0, "dead letters counted {dead}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_is_cancelled_and_shows_live_progress() -> anyhow::Result<()> {
    let (_cluster, _runners, gateway) = cluster(2).await?;
    let http = &gateway.http;
    let id = enqueue(
        http,
        json!({"type": "diag.sleep", "payload": {"ms": 60000}}),
    )
    .await?;
    await_status(http, &id, "running").await?;
    // The handler reports its progress as it starts; the live view shows it.
    wait_until(DEADLINE, "live progress", || async {
        let live = show(http, &id).await?;
        Ok(live["status"] == "running"
            && live["progress"] == json!({"percent": 10, "message": "sleeping"}))
    })
    .await?;
    let cancel = http
        .post_json(&format!("/jobs/{id}/cancel"), &json!({}), &[])
        .await?;
    ensure!(cancel.status == StatusCode::ACCEPTED, "{}", cancel.text());
    ensure!(cancel.json()?["running"] == true, "{}", cancel.text());
    let job = await_status(http, &id, "cancelled").await?;
    ensure!(outcomes(&job) == ["cancelled"], "{job}");
    ensure!(
        job["attempts"][0]["notes"] == json!([{"observed": "cancelled"}]),
        "{job}"
    );

    // A job that is not running is cancelled too: its scheduled attempt never runs.
    let later = Utc::now() + chrono::Duration::seconds(2);
    let id = enqueue(
        http,
        json!({"type": "diag.noop", "payload": {}, "run_at": later}),
    )
    .await?;
    let cancel = http
        .post_json(&format!("/jobs/{id}/cancel"), &json!({}), &[])
        .await?;
    ensure!(cancel.json()?["running"] == false, "{}", cancel.text());
    await_status(http, &id, "cancelled").await?;
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_secs(3)).await;
    let job = show(http, &id).await?;
    ensure!(
        job["status"] == "cancelled" && outcomes(&job).is_empty(),
        "{job}"
    );
    // A cancel that changes nothing says so: of a cancelled job, of one that succeeded.
    cancel_changes_nothing(http, &id, "cancelled").await?;
    let done = enqueue(http, json!({"type": "diag.noop", "payload": {}})).await?;
    await_status(http, &done, "succeeded").await?;
    cancel_changes_nothing(http, &done, "succeeded").await?;
    ensure!(
        show(http, &done).await?["status"] == "succeeded",
        "unchanged"
    );
    Ok(())
}

/// A cancel of job `id`, already `state`, is refused as changing nothing.
async fn cancel_changes_nothing(http: &Http, id: &str, state: &str) -> anyhow::Result<()> {
    let answer = http
        .post_json(&format!("/jobs/{id}/cancel"), &json!({}), &[])
        .await?;
    ensure!(
        answer.status == StatusCode::UNPROCESSABLE_ENTITY
            && answer.error()?.0 == "not_cancellable"
            && answer.text().contains(&format!("already {state}")),
        "{} {}",
        answer.status,
        answer.text()
    );
    // Another tenant learns nothing from the 422s: its cancel or retry of this job is the
    // 404 of no job at all.
    for action in ["cancel", "retry"] {
        let foreign = http
            .post_json(
                &format!("/jobs/{id}/{action}"),
                &json!({}),
                &[("X-Tenant-Id", "globex")],
            )
            .await?;
        ensure!(
            foreign.status == StatusCode::NOT_FOUND && foreign.error()?.0 == "unknown_job",
            "{action} as another tenant: {} {}",
            foreign.status,
            foreign.text()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_enqueued_ten_times_at_once_is_one_job() -> anyhow::Result<()> {
    let (_cluster, _runners, gateway) = cluster(2).await?;
    let http = &gateway.http;
    let body = json!({"type": "diag.noop", "payload": {}, "key": "once"});
    let calls = (0..10).map(|_| enqueue(http, body.clone()));
    let ids = futures::future::try_join_all(calls).await?;
    ensure!(ids.iter().all(|id| id == &ids[0]), "ids {ids:?}");
    // The header names the same job as the field.
    let response = http
        .post_json(
            "/jobs",
            &json!({"type": "diag.noop", "payload": {}}),
            &[("Idempotency-Key", "once")],
        )
        .await?;
    ensure!(
        response.json()?["id"] == ids[0].as_str(),
        "{}",
        response.text()
    );
    let job = await_status(http, &ids[0], "succeeded").await?;
    ensure!(outcomes(&job) == ["succeeded"], "{job}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_enqueues_are_400s_or_422s_naming_the_field() -> anyhow::Result<()> {
    let (_cluster, _runners, gateway) = cluster(1).await?;
    let http = &gateway.http;
    // 400: what the document forbids; 422: what it cannot say (a payload its type refuses,
    // a backoff whose first wait is above its longest).
    let cases = [
        (
            json!({"type": "nope", "payload": {}}),
            400,
            "unknown_type",
            "field `type`",
        ),
        (
            json!({"type": "diag.flaky", "payload": {"fail_times": "x"}}),
            422,
            "bad_payload",
            "field `payload`",
        ),
        (
            json!({"type": "diag.noop", "payload": {}, "max_attempts": 0}),
            400,
            "bad_body",
            "max_attempts",
        ),
        (
            json!({"type": "diag.noop", "payload": {}, "timeout_ms": 604_800_001_u64}),
            400,
            "bad_body",
            "timeout_ms",
        ),
        (
            json!({"type": "diag.noop", "payload": {},
                   "backoff": {"first_ms": 5000, "max_ms": 1000}}),
            422,
            "bad_backoff",
            "first_ms ≤ max_ms",
        ),
        (json!({"payload": {}}), 400, "bad_body", "type"),
    ];
    for (body, status, code, names) in cases {
        let response = http.post_json("/jobs", &body, &[]).await?;
        ensure!(
            response.status.as_u16() == status,
            "{body}: {}",
            response.status
        );
        let (got, _) = response.error()?;
        ensure!(
            got == code && response.text().contains(names),
            "{body}: {}",
            response.text()
        );
    }
    let missing = http.get(&format!("/jobs/{}", uuid::Uuid::now_v7())).await?;
    ensure!(
        missing.status == StatusCode::NOT_FOUND,
        "{}",
        missing.text()
    );
    for bad in ["not-a-uuid", &uuid::Uuid::now_v7().simple().to_string()] {
        let bad = http.get(&format!("/jobs/{bad}")).await?;
        ensure!(bad.status == StatusCode::BAD_REQUEST, "{}", bad.text());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_owner_while_500_jobs_run_leaves_each_succeeded_once() -> anyhow::Result<()> {
    const JOBS: usize = 500;
    let (cluster, mut runners, gateway) = cluster(3).await?;
    let http = &gateway.http;
    sqlx::query("CREATE TABLE diag_job_effects (job_id text PRIMARY KEY, hits int NOT NULL)")
        .execute(&cluster.pool)
        .await?;
    let body = json!({"type": "diag.count", "payload": {"ms": 15000}});
    let mut ids = Vec::new();
    for _ in 0..JOBS / 50 {
        let batch = (0..50).map(|_| enqueue(http, body.clone()));
        ids.extend(futures::future::try_join_all(batch).await?);
    }
    // Kill -9 one runner once every job has started and attempts are in flight (each
    // sleeps 15 s before its side effect; on a loaded machine the first may be done by the
    // time the last starts, which the effects check below allows for).
    wait_until(DEADLINE, "every job started", || async {
        for chunk in ids.chunks(50) {
            let views =
                futures::future::try_join_all(chunk.iter().map(|id| show(http, id))).await?;
            if views
                .iter()
                .any(|v| v["status"] != "running" && v["status"] != "succeeded")
            {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    let effects = || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM diag_job_effects")
            .fetch_one(&cluster.pool)
            .await?;
        anyhow::Ok(n)
    };
    ensure!(
        effects().await? < JOBS as i64,
        "the jobs finished before the kill"
    );
    runners[0].kill()?;
    let killed_at = Utc::now();

    let long = Duration::from_secs(120);
    wait_until(long, "every job succeeded", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM shoal_entity_state
              WHERE entity_type = 'job' AND state->>'status' = 'succeeded'",
        )
        .fetch_one(&cluster.pool)
        .await?;
        Ok(n == JOBS as i64)
    })
    .await?;
    // Exactly-once state: each record has one succeeded attempt and no other outcome.
    let records: Vec<(String, Value)> =
        sqlx::query_as("SELECT entity_id, state FROM shoal_entity_state WHERE entity_type = 'job'")
            .fetch_all(&cluster.pool)
            .await?;
    ensure!(records.len() == JOBS, "{} records", records.len());
    let mut rerun = 0;
    for (id, state) in &records {
        ensure!(outcomes(state) == ["succeeded"], "job {id}: {state}");
        ensure!(ids.contains(id), "job {id} was never enqueued");
        // Every job had started by the kill; one whose recorded attempt started after it
        // was cut by the kill and run again by the shard's next owner.
        if time(&state["attempts"][0]["started_at"])? > killed_at {
            rerun += 1;
        }
    }
    ensure!(rerun > 0, "no attempt was running on the killed runner");
    // The keyed side effect: one row per job; an attempt cut by the kill ran again, which
    // at-least-once attempts allow, but no job is missing.
    let (rows, total): (i64, i64) =
        sqlx::query_as("SELECT count(*), sum(hits)::int8 FROM diag_job_effects")
            .fetch_one(&cluster.pool)
            .await?;
    ensure!(rows == JOBS as i64, "{rows} jobs ran their side effect");
    eprintln!(
        "{rerun} attempts cut by the kill ran again; side effects: {rows} jobs, {total} hits"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listing_pages_by_state_and_type() -> anyhow::Result<()> {
    let (_cluster, _runners, gateway) = cluster(2).await?;
    let http = &gateway.http;
    let mut dead = Vec::new();
    for _ in 0..3 {
        let body = json!({"type": "diag.flaky", "payload": {"fail_times": 1}, "max_attempts": 1});
        dead.push(enqueue(http, body).await?);
    }
    let mut done = Vec::new();
    for _ in 0..2 {
        done.push(enqueue(http, json!({"type": "diag.noop", "payload": {}})).await?);
    }
    for id in &dead {
        await_status(http, id, "dead").await?;
    }
    for id in &done {
        await_status(http, id, "succeeded").await?;
    }
    // Dead jobs, two per page, newest first.
    let first = http.get("/jobs?state=dead&limit=2").await?.json()?;
    let cursor = first["next_cursor"].as_str().context("a second page")?;
    let second = http
        .get(&format!("/jobs?state=dead&limit=2&cursor={cursor}"))
        .await?
        .json()?;
    ensure!(second.get("next_cursor").is_none(), "{second}");
    let listed: Vec<&str> = [&first, &second]
        .iter()
        .flat_map(|page| page["jobs"].as_array().into_iter().flatten())
        .filter_map(|job| job["id"].as_str())
        .collect();
    let mut expected: Vec<&str> = dead.iter().map(String::as_str).rev().collect();
    expected.sort_by(|a, b| b.cmp(a));
    ensure!(listed == expected, "listed {listed:?}, dead {expected:?}");
    let noop = http
        .get("/jobs?type=diag.noop&state=succeeded")
        .await?
        .json()?;
    ensure!(noop["jobs"].as_array().map(Vec::len) == Some(2), "{noop}");
    for bad in [
        "/jobs?state=sleepy",
        "/jobs?limit=0",
        "/jobs?cursor=x",
        "/jobs?colour=red",
    ] {
        let response = http.get(bad).await?;
        ensure!(
            response.status == StatusCode::BAD_REQUEST,
            "{bad}: {}",
            response.text()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_ten_thousand_jobs_by_state_is_an_index_scan() -> anyhow::Result<()> {
    use shoal_jobs::listing::{ListQuery, list, query};
    let cluster = TestCluster::new(16).await?;
    // 10k job records as the job entity commits them, a fifth of them dead.
    sqlx::query(
        "INSERT INTO shoal_entity_state (cluster, entity_type, entity_id, state, message_id)
         SELECT $1, 'job', id, jsonb_build_object('id', id, 'type', 'diag.noop',
                'payload', '{}'::jsonb, 'status', CASE WHEN n % 5 = 0 THEN 'dead' ELSE 'succeeded' END,
                'max_attempts', 1, 'timeout_ms', 1000, 'attempts', '[]'::jsonb,
                'budget_start', 0, 'generation', 0), n
           FROM (SELECT n, lpad(to_hex(n), 8, '0') || '-0000-7000-8000-000000000000' AS id
                   FROM generate_series(1, 10000) AS n) AS jobs",
    )
    .bind(&cluster.name)
    .execute(&cluster.pool)
    .await?;
    sqlx::query("ANALYZE shoal_entity_state")
        .execute(&cluster.pool)
        .await?;
    let filter = ListQuery {
        state: Some("dead".to_owned()),
        limit: Some(50),
        ..ListQuery::default()
    };
    // The listing's own statement, prepared and explained with its values.
    let listing = query(&cluster.name, None, &filter, 50)
        .sql()
        .as_str()
        .to_owned();
    ensure!(listing.contains("state->>'status' = $2"), "{listing}");
    let mut conn = cluster.pool.acquire().await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "PREPARE listing (text, text, int8) AS {listing}"
    )))
    .execute(&mut *conn)
    .await?;
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, FORMAT TEXT) EXECUTE listing ('{}', 'dead', 51)",
        cluster.name
    )))
    .fetch_all(&mut *conn)
    .await?;
    drop(conn);
    let plan = plan.join("\n");
    eprintln!("{plan}");
    ensure!(
        plan.contains("shoal_jobs_by_status") && !plan.contains("Seq Scan"),
        "{plan}"
    );
    let started = std::time::Instant::now();
    let page = list(&cluster.pool, &cluster.name, None, &filter).await?;
    eprintln!(
        "a page of 50 dead jobs out of 10k in {:?}",
        started.elapsed()
    );
    ensure!(
        page.jobs.len() == 50 && page.next_cursor.is_some(),
        "{page:?}"
    );
    ensure!(
        page.jobs
            .iter()
            .all(|j| j.status == shoal_jobs::JobStatus::Dead)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_shows_cancels_and_retries_jobs() -> anyhow::Result<()> {
    let (cluster, _runners, gateway) = cluster(1).await?;
    let http = &gateway.http;
    let url = format!("http://{}", gateway.addr);
    let shoal = |args: Vec<String>| {
        let dir = cluster.dir.clone();
        async move {
            let mut command = common::shoal_command(&dir);
            command.args(&args);
            let output = shoal_testkit::process::output_within(&mut command, DEADLINE).await?;
            ensure!(
                output.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            Ok::<Value, anyhow::Error>(serde_json::from_slice(&output.stdout)?)
        }
    };
    let id = enqueue(
        http,
        json!({"type": "diag.sleep", "payload": {"ms": 60000}}),
    )
    .await?;
    await_status(http, &id, "running").await?;
    let cancelled = shoal(vec![
        "jobs".into(),
        "cancel".into(),
        id.clone(),
        "--gateway".into(),
        url.clone(),
    ])
    .await?;
    ensure!(cancelled["running"] == true, "{cancelled}");
    await_status(http, &id, "cancelled").await?;
    let shown = shoal(vec![
        "jobs".into(),
        "show".into(),
        id.clone(),
        "--gateway".into(),
        url.clone(),
    ])
    .await?;
    ensure!(shown["status"] == "cancelled", "{shown}");
    let list = ["jobs", "list", "--state", "cancelled", "--gateway", &url];
    let listed = shoal(list.iter().map(|s| s.to_string()).collect()).await?;
    ensure!(listed["jobs"][0]["id"] == id.as_str(), "{listed}");
    let retried = shoal(vec![
        "jobs".into(),
        "retry".into(),
        id.clone(),
        "--gateway".into(),
        url.clone(),
    ])
    .await?;
    ensure!(retried["status"] == "queued", "{retried}");
    await_status(http, &id, "running").await?;
    Ok(())
}

/// A cluster of `runners` runners sharing the test's Redis prefix (the limits' home), and
/// a gateway.
async fn cluster_with_redis(runners: usize) -> anyhow::Result<(TestCluster, Vec<Runner>, Gateway)> {
    let cluster = TestCluster::new(16).await?;
    let redis = vec![
        (
            "SHOAL__REDIS__URL".to_owned(),
            "redis://127.0.0.1:6379".to_owned(),
        ),
        (
            "SHOAL__REDIS__KEY_PREFIX".to_owned(),
            format!("shoal-test:{}", cluster.db.name),
        ),
    ];
    let mut started = Vec::new();
    for _ in 0..runners {
        let options = common::RunnerOptions {
            env: redis.clone(),
            ..Default::default()
        };
        started.push(cluster.start_runner_with(options).await?);
    }
    cluster
        .await_balanced(&started.iter().collect::<Vec<_>>())
        .await?;
    let gateway = Gateway::start(&cluster, GatewayOptions::default()).await?;
    Ok((cluster, started, gateway))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_per_key_holds_across_three_runners() -> anyhow::Result<()> {
    let (_cluster, _runners, gateway) = cluster_with_redis(3).await?;
    let http = &gateway.http;
    // `diag.rated`: at most 4 starts per second per tenant.
    // All at once, so they arrive faster than the limit lets them start.
    let tenants: Vec<&str> = (0..24)
        .map(|i| if i % 2 == 0 { "a" } else { "b" })
        .collect();
    let enqueued = futures::future::try_join_all(tenants.iter().map(|tenant| {
        enqueue(
            http,
            json!({"type": "diag.rated", "payload": {"tenant": tenant}}),
        )
    }))
    .await?;
    let ids: Vec<(&str, String)> = tenants.into_iter().zip(enqueued).collect();
    let saw_waiting = std::sync::atomic::AtomicBool::new(false);
    wait_until(
        Duration::from_secs(60),
        "every rated job succeeded",
        || async {
            let views =
                futures::future::try_join_all(ids.iter().map(|(_, id)| show(http, id))).await?;
            if views.iter().any(|v| {
                v["waiting"]
                    .as_str()
                    .is_some_and(|w| w.starts_with("rate limited"))
            }) {
                saw_waiting.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(views.iter().all(|v| v["status"] == "succeeded"))
        },
    )
    .await?;
    ensure!(
        saw_waiting.into_inner(),
        "no job said it waited for the rate"
    );
    let mut starts: std::collections::BTreeMap<&str, Vec<DateTime<Utc>>> = Default::default();
    for (tenant, id) in &ids {
        let job = show(http, id).await?;
        let attempts = job["attempts"].as_array().context("attempts")?;
        ensure!(attempts.len() == 1, "one attempt each: {job}");
        starts
            .entry(tenant)
            .or_default()
            .push(time(&attempts[0]["started_at"])?);
    }
    // No five starts of one tenant inside one second (less a margin for the moment an
    // attempt records its start after the window admitted it).
    let margin = chrono::Duration::milliseconds(200);
    for (tenant, times) in &mut starts {
        times.sort();
        for pair in times.windows(5) {
            let span = pair[4] - pair[0];
            ensure!(
                span >= chrono::Duration::seconds(1) - margin,
                "tenant {tenant}: 5 starts within {span}: {times:?}"
            );
        }
    }
    // The limit is per tenant: together the two went faster than one tenant may.
    let mut all: Vec<_> = starts.values().flatten().copied().collect();
    all.sort();
    ensure!(
        all.windows(5)
            .any(|pair| pair[4] - pair[0] < chrono::Duration::seconds(1) - margin),
        "the tenants shared one limit: {all:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_limit_of_three_holds_across_three_runners() -> anyhow::Result<()> {
    let (_cluster, _runners, gateway) = cluster_with_redis(3).await?;
    let http = &gateway.http;
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(
            enqueue(
                http,
                json!({"type": "diag.limited", "payload": {"ms": 1000}}),
            )
            .await?,
        );
    }
    // (most running at once, samples, whether a job said why it waited)
    let seen = std::sync::Mutex::new((0usize, 0usize, false));
    let sample = || async {
        let views = futures::future::try_join_all(ids.iter().map(|id| show(http, id))).await?;
        let running = views.iter().filter(|v| v["status"] == "running").count();
        let waiting = views.iter().any(|v| {
            v["waiting"]
                .as_str()
                .is_some_and(|w| w.starts_with("waiting for a slot"))
        });
        let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.0 = seen.0.max(running);
        seen.1 += 1;
        seen.2 |= waiting;
        Ok(views.iter().all(|v| v["status"] == "succeeded"))
    };
    wait_until(
        Duration::from_secs(60),
        "every limited job succeeded",
        sample,
    )
    .await?;
    let (most, samples, saw_waiting) = seen.into_inner().unwrap_or_else(|e| e.into_inner());
    eprintln!("{samples} samples, at most {most} running at once");
    ensure!(most <= 3, "{most} running at once");
    ensure!(most >= 2, "the limit was never approached: at most {most}");
    ensure!(saw_waiting, "no job said why it waited");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_pruned_after_the_retention_and_free_their_key() -> anyhow::Result<()> {
    let cluster = TestCluster::new(16).await?;
    // `[jobs] retention` through the environment: the runtime's loader leaves the section
    // to the application.
    let env = vec![
        ("SHOAL__JOBS__RETENTION".to_owned(), "2s".to_owned()),
        ("SHOAL__JOBS__SWEEP_INTERVAL".to_owned(), "200ms".to_owned()),
    ];
    let mut runners = Vec::new();
    for _ in 0..2 {
        let options = common::RunnerOptions {
            env: env.clone(),
            ..Default::default()
        };
        runners.push(cluster.start_runner_with(options).await?);
    }
    cluster
        .await_balanced(&runners.iter().collect::<Vec<_>>())
        .await?;
    let gateway = Gateway::start(&cluster, GatewayOptions::default()).await?;
    let http = &gateway.http;
    let body = json!({"type": "diag.noop", "payload": {}, "key": "pruned-key"});
    let first = enqueue(http, body.clone()).await?;
    let done = await_status(http, &first, "succeeded").await?;
    let finished = time(&done["finished_at"])?;
    // While kept, the key names the finished job.
    ensure!(
        enqueue(http, body.clone()).await? == first,
        "the key was freed early"
    );
    wait_until(DEADLINE, "the finished job pruned", || async {
        Ok(http.get(&format!("/jobs/{first}")).await?.status == StatusCode::NOT_FOUND)
    })
    .await?;
    let kept = (Utc::now() - finished).to_std()?;
    ensure!(kept >= Duration::from_secs(2), "pruned after {kept:?}");
    let listed = http.get("/jobs?type=diag.noop").await?.json()?;
    ensure!(
        listed["jobs"] == json!([]),
        "a pruned job is listed: {listed}"
    );
    // The emptied rows of the job and of its key are deleted, not left behind.
    let rows = |entity_type: &'static str, id: String| {
        let pool = cluster.pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM shoal_entity_state WHERE entity_type = $1 AND entity_id = $2",
            )
            .bind(entity_type)
            .bind(id)
            .fetch_one(&pool)
            .await?;
            anyhow::Ok(n)
        }
    };
    let key_id = shoal_jobs::key::key_entity_id(None, "diag.noop", "pruned-key");
    wait_until(
        DEADLINE,
        "the pruned job's and key's rows swept",
        || async {
            Ok(rows("job", first.clone()).await? + rows("job-key", key_id.clone()).await? == 0)
        },
    )
    .await?;
    // The key is free again: a new job.
    let second = enqueue(http, body).await?;
    ensure!(second != first, "the key still named the pruned job");
    await_status(http, &second, "succeeded").await?;
    ensure!(
        rows("job", second.clone()).await? == 1,
        "a live job's row went"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_schedule_enqueues_one_job_per_instant() -> anyhow::Result<()> {
    let cluster = TestCluster::new(16).await?;
    // The application's `[jobs]` section sits in the same file as the runtime's.
    let toml = "[jobs]\nretention = \"1h\"\n\n[[cron]]\nname = \"every-second\"\n\
                expression = \"* * * * * *\"\n\
                target = { entity-type = \"job-cron\", entity-id = \"diag.noop\", \
                message = \"fire\", payload = { schedule = \"{{name}}\", \
                instant = \"{{instant}}\", payload = {} } }\n";
    let path = cluster.dir.join("jobs-cron.toml");
    std::fs::write(&path, toml)?;
    let env = vec![("SHOAL_CONFIG".to_owned(), path.display().to_string())];
    let mut runners = Vec::new();
    for _ in 0..2 {
        let options = common::RunnerOptions {
            env: env.clone(),
            ..Default::default()
        };
        runners.push(cluster.start_runner_with(options).await?);
    }
    let count = || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM shoal_entity_state
              WHERE entity_type = 'job' AND state->>'status' = 'succeeded'
                AND state->>'key' LIKE 'cron:every-second:%'",
        )
        .fetch_one(&cluster.pool)
        .await?;
        anyhow::Ok(n)
    };
    wait_until(DEADLINE, "three cron jobs succeeded", || async {
        Ok(count().await? >= 3)
    })
    .await?;
    // One job per instant: no key names two jobs, and each key's job is the key's holder.
    let keys: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state->>'key', count(*) FROM shoal_entity_state
          WHERE entity_type = 'job' GROUP BY 1",
    )
    .fetch_all(&cluster.pool)
    .await?;
    ensure!(keys.iter().all(|(_, n)| *n == 1), "{keys:?}");
    ensure!(keys.len() >= 3, "{keys:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_enqueued_from_rust_through_the_client_and_from_a_handler_once()
-> anyhow::Result<()> {
    use shoal_cli::probe::{Probe, ProbeMessage};
    use shoal_jobs::diagnostic::Noop;
    use shoal_jobs::{JobRequest, enqueue as enqueue_job};

    let (cluster, _runners, gateway) = cluster(2).await?;
    let http = &gateway.http;
    let client =
        common::gateway::TestClient::connect(&cluster, common::gateway::DEFAULT_SECRET, 4, true)
            .await?;

    // Through the typed client: a key names one job however often it is enqueued.
    let request = JobRequest::of::<Noop>(&Default::default())?
        .key("rust-1")
        .priority(3);
    let first = enqueue_job(&client.client, request.clone()).await?;
    let again = enqueue_job(&client.client, request).await?;
    ensure!(first == again, "{first:?} then {again:?}");
    let job = await_status(http, &first.id, "succeeded").await?;
    ensure!(job["key"] == "rust-1" && job["priority"] == 3, "{job}");

    // From a handler: its first delivery enqueues and then panics; the replay enqueues
    // again under the same derived key, so there is one job, the one the reply names.
    let reply = client
        .entity::<Probe>("enqueuer")
        .ask(ProbeMessage::EnqueueNoop { fail_first: true })
        .await?;
    let id = reply["job"].as_str().context("a job id")?.to_owned();
    await_status(http, &id, "succeeded").await?;
    let from_handlers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM shoal_entity_state
          WHERE cluster = $1 AND entity_type = 'job' AND state->>'key' LIKE 'ctx:%'",
    )
    .bind(&cluster.name)
    .fetch_one(&cluster.pool)
    .await?;
    ensure!(from_handlers == 1, "{from_handlers} jobs from the handler");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leading_runner_exports_waiting_and_dead_jobs_by_type() -> anyhow::Result<()> {
    let cluster = TestCluster::new(16).await?;
    let mut runners = Vec::new();
    for _ in 0..2 {
        let options = common::RunnerOptions {
            env: vec![("SHOAL__JOBS__GAUGE_INTERVAL".to_owned(), "200ms".to_owned())],
            ..Default::default()
        };
        runners.push(cluster.start_runner_with(options).await?);
    }
    cluster
        .await_balanced(&runners.iter().collect::<Vec<_>>())
        .await?;
    let gateway = Gateway::start(&cluster, GatewayOptions::default()).await?;
    let http = &gateway.http;
    for _ in 0..2 {
        let body = json!({"type": "diag.flaky", "payload": {"fail_times": 5}, "max_attempts": 1});
        let id = enqueue(http, body).await?;
        await_status(http, &id, "dead").await?;
    }
    let later = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    enqueue(
        http,
        json!({"type": "diag.noop", "payload": {}, "run_at": later}),
    )
    .await?;
    // Summed over the runners: only the leader reports non-zero values.
    let gauge = |status: &'static str, job_type: &'static str| {
        metric_sum(
            &runners,
            "shoal_jobs",
            [("status", status), ("type", job_type)],
        )
    };
    wait_until(
        DEADLINE,
        "2 dead diag.flaky, 1 scheduled diag.noop",
        || async {
            Ok(gauge("dead", "diag.flaky").await? == 2.0
                && gauge("scheduled", "diag.noop").await? == 1.0)
        },
    )
    .await?;
    Ok(())
}
