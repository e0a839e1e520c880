//! `GET /extractions/{id}/events`: the extraction's journal as Server-Sent Events, read
//! from Postgres (every gateway serves every extraction; nothing is held in memory).
//!
//! Each event is `id: <seq>`, `event: started | progress | complete | failed`, `data:
//! <json>`. A stream starts after the `Last-Event-ID` a reconnecting client sends (resume),
//! or else at the latest run's `started`; it ends after `complete` or `failed`. A stream
//! reads the journal after the seq it holds when the runner that appended wakes it over the
//! notification carrier (module `watch`), with a fallback read every
//! `notifications.sync-interval` (every 100 ms on a gateway without Redis); one small
//! indexed query per read. Streams count under the gateway's caps with every other stream
//! (`notifications::slots`: 503 past the gateway's, 429 past the tenant's). Only the
//! extraction's tenant reads its journal (another tenant's id is a 404, as on `GET`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::Path;
use axum::extract::rejection::PathRejection;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::Stream;
use shoal::gateway::{ApiError, ErrorBody};

use super::api::{ExtractionApi, may_read, parse_id};
use super::journal::{Event, Journal};
use super::model::ExtractionId;
use super::watch::{JournalWatch, Reader};
use shoal_notifications::Tenant;

/// The pause after a failed read of the journal.
const ERROR_PAUSE: Duration = Duration::from_millis(500);
/// Events read per query.
const PAGE: i64 = 100;

fn is_end(kind: &str) -> bool {
    kind == "complete" || kind == "failed"
}

/// The extraction's events as SSE.
#[utoipa::path(
    get,
    path = "/extractions/{id}/events",
    params(
        ("id" = String, Path, description = "The extraction's id"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event (its seq)"),
    ),
    responses(
        (status = 200, description = "text/event-stream of started, progress {stage, percent}, complete {result} | failed {error}; ends after complete or failed",
            body = String, content_type = "text/event-stream"),
        (status = 400, description = "Not an extraction id, or a bad Last-Event-ID", body = ErrorBody),
        (status = 404, description = "No such extraction of the caller's tenant", body = ErrorBody),
        (status = 429, description = "The caller's tenant holds its maximum of streams on this gateway (`max-subscribers-per-tenant`; `Retry-After`)", body = ErrorBody),
        (status = 503, description = "Storage is unavailable, or this gateway holds its maximum of streams", body = ErrorBody),
    ),
    tag = "extractions"
)]
pub(crate) async fn events(
    Extension(api): Extension<Arc<ExtractionApi>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let Path(id) = path?;
    let id = parse_id(&id)?;
    let caller = Tenant::of_caller(&headers)?;
    let journal = api.journal.clone().ok_or_else(|| ApiError::Unavailable {
        code: "storage_unavailable",
        message: "this gateway has no database".to_owned(),
        retry: shoal::retry::RetryClass::Safe,
    })?;
    let unavailable = |e: super::journal::JournalError| ApiError::Unavailable {
        code: "storage_unavailable",
        message: e.to_string(),
        retry: shoal::retry::RetryClass::Safe,
    };
    let start = journal
        .latest_run_start(id.as_str())
        .await
        .map_err(unavailable)?
        .filter(|start| may_read(&api, caller.as_ref(), start.tenant.as_deref()))
        .ok_or_else(|| ApiError::unknown("unknown_extraction", "extraction", &id))?;
    let after = match headers.get("last-event-id") {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(shoal_notifications::routes::parse_event_id)
            .and_then(|seq| i64::try_from(seq).ok())
            .ok_or_else(|| {
                ApiError::bad_request(
                    "bad_last_event_id",
                    "`Last-Event-ID` must be an event's seq (1 to 18 decimal digits)",
                )
            })?,
        None => start.before,
    };
    let reader = api
        .watch
        .follow(id.as_str(), caller.as_ref().map(Tenant::as_str))?;
    Ok(Sse::new(follow(journal, reader, id.to_string(), after)).keep_alive(KeepAlive::default()))
}

struct Cursor {
    journal: Journal,
    reader: Reader,
    id: String,
    after: i64,
    pending: std::collections::VecDeque<Event>,
    ended: bool,
}

/// The events of `id` after `after`, as they are appended, until the end.
fn follow(
    journal: Journal,
    reader: Reader,
    id: String,
    after: i64,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let cursor = Cursor {
        journal,
        reader,
        id,
        after,
        pending: Default::default(),
        ended: false,
    };
    futures::stream::unfold(cursor, |mut cursor| async move {
        loop {
            if cursor.ended {
                return None;
            }
            if let Some(event) = cursor.pending.pop_front() {
                cursor.after = event.seq;
                cursor.ended = is_end(&event.kind);
                let sse = SseEvent::default()
                    .id(event.seq.to_string())
                    .event(event.kind.clone())
                    .data(event.data.to_string());
                return Some((Ok(sse), cursor));
            }
            cursor.reader.seen();
            match cursor.journal.after(&cursor.id, cursor.after, PAGE).await {
                Ok(events) if !events.is_empty() => cursor.pending.extend(events),
                Ok(_) => cursor.reader.wait(None).await,
                Err(error) => {
                    tracing::warn!(%error, "reading the extraction journal");
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            }
        }
    })
}

/// Waits up to `timeout` for the latest run of `id` to end; whether it did. The wait holds
/// a stream's place for the `caller`'s tenant: a gateway at its cap, or a tenant at its
/// own, does not wait (the caller answers 202 and follows `status_url`).
pub(crate) async fn await_end(
    journal: &Journal,
    watch: &JournalWatch,
    id: &ExtractionId,
    caller: Option<&Tenant>,
    timeout: Duration,
) -> bool {
    let until = tokio::time::Instant::now() + timeout;
    let id = id.as_str();
    let Ok(mut reader) = watch.follow(id, caller.map(Tenant::as_str)) else {
        return false;
    };
    let Ok(Some(start)) = journal.latest_run_start(id).await else {
        return false;
    };
    let mut after = start.before;
    while tokio::time::Instant::now() < until {
        reader.seen();
        match journal.after(id, after, PAGE).await {
            Ok(events) => {
                if events.iter().any(|e| is_end(&e.kind)) {
                    return true;
                }
                if let Some(last) = events.last() {
                    after = last.seq;
                    continue;
                }
                reader.wait(Some(until)).await;
            }
            Err(error) => {
                tracing::warn!(%error, "reading the extraction journal");
                tokio::time::sleep(
                    ERROR_PAUSE.min(until.saturating_duration_since(tokio::time::Instant::now())),
                )
                .await;
            }
        }
    }
    false
}
