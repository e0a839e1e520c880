//! One subscriber's stream: the missed events from the history, then the live ones from
//! the hub, as SSE frames.
//!
//! The subscriber keeps its `position` (the last seq it has passed, sent or filtered out):
//! history covers `(position, live_from]`, live events are taken only when they continue
//! it, so the hand-over from history to live has neither gap nor duplicate. `event:
//! reset` (data `{reason, oldest, newest, resume_after}`) says the stream cannot continue
//! where the client asked: `expired` (the id is older than the history keeps; the frame's
//! own `id:` is the one before the oldest kept, so the client resumes there), `unknown_id`
//! (an id this tenant never gave; the stream starts from now) or `slow_consumer` (its
//! buffer overflowed; the stream ends, and the client resumes from its last id).

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::response::sse;
use futures::Stream;
use serde_json::json;

use super::history::{Bounds, Event, History};
use super::hub::Joined;
use super::slots::Slot;
use super::{Tenant, metrics};

/// The SSE event name of a reset frame.
pub const RESET: &str = "reset";
/// Events read per history query.
const PAGE: u32 = 500;

/// What a subscriber asked for.
#[derive(Debug, Clone)]
pub struct Request {
    /// The tenant.
    pub tenant: Tenant,
    /// Only these topics (empty: all).
    pub topics: HashSet<String>,
    /// The last id the client saw (`Last-Event-ID`), if any.
    pub last_event_id: Option<u64>,
    /// The `retry:` to send.
    pub retry: std::time::Duration,
}

enum Phase {
    History,
    Live,
    Done,
}

struct State {
    request: Request,
    history: History,
    joined: Joined,
    position: u64,
    phase: Phase,
    pending: VecDeque<sse::Event>,
    newest: u64,
    // Held for the stream's life: the subscriber's place under the cap.
    _slot: Slot,
}

fn reset(reason: &'static str, bounds: Bounds, resume_after: u64) -> sse::Event {
    metrics::reset(reason);
    let data = json!({
        "reason": reason,
        "oldest": bounds.oldest,
        "newest": bounds.newest,
        "resume_after": resume_after,
    });
    sse::Event::default().event(RESET).data(data.to_string())
}

/// Where the stream starts and what it says first, from the client's id and the history.
fn start(request: &Request, bounds: Bounds, live_from: u64) -> (u64, Option<sse::Event>) {
    let Some(asked) = request.last_event_id else {
        return (live_from, None);
    };
    if asked > bounds.newest.max(live_from) {
        return (live_from, Some(reset("unknown_id", bounds, live_from)));
    }
    let first_kept = bounds.oldest.unwrap_or(bounds.newest + 1);
    if first_kept > asked + 1 {
        let resume = first_kept - 1;
        let frame = reset("expired", bounds, resume).id(resume.to_string());
        return (resume, Some(frame));
    }
    (asked, None)
}

/// The SSE stream of a subscriber who has joined its tenant's feed (`bounds` read from the
/// history before joining).
pub fn events(
    request: Request,
    history: History,
    bounds: Bounds,
    joined: Joined,
    slot: Slot,
) -> impl Stream<Item = Result<sse::Event, Infallible>> {
    let (position, first) = start(&request, bounds, joined.live_from);
    let mut pending = VecDeque::new();
    pending.push_back(sse::Event::default().retry(request.retry));
    pending.extend(first);
    let state = State {
        request,
        history,
        position,
        phase: Phase::History,
        pending,
        newest: bounds.newest,
        joined,
        _slot: slot,
    };
    futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(frame) = state.pending.pop_front() {
                return Some((Ok(frame), state));
            }
            match state.phase {
                Phase::Done => return None,
                Phase::History => state.read_history().await,
                Phase::Live => state.next_live().await,
            }
        }
    })
}

impl State {
    fn frame(&mut self, event: &Event) {
        self.position = event.seq;
        self.newest = self.newest.max(event.seq);
        let topics = &self.request.topics;
        if !topics.is_empty() && !topics.contains(&event.topic) {
            return;
        }
        let latency = (chrono::Utc::now() - event.published_at)
            .to_std()
            .unwrap_or_default();
        metrics::delivered(latency);
        self.pending.push_back(
            sse::Event::default()
                .id(event.seq.to_string())
                .event(&event.topic)
                .data(event.data.to_string()),
        );
    }

    async fn read_history(&mut self) {
        let live_from = self.joined.live_from;
        if self.position >= live_from {
            self.phase = Phase::Live;
            return;
        }
        match self
            .history
            .read(&self.request.tenant, self.position, live_from, PAGE)
            .await
        {
            Ok(events) if events.is_empty() => {
                // Nothing kept up to `live_from` (expired meanwhile): go on live.
                self.position = live_from;
                self.phase = Phase::Live;
            }
            Ok(events) => {
                for event in &events {
                    self.frame(event);
                }
            }
            Err(error) => {
                // The client reconnects (`retry:`) and resumes from its last id.
                tracing::warn!(%error, tenant = %self.request.tenant, "reading the history failed");
                self.phase = Phase::Done;
            }
        }
    }

    async fn next_live(&mut self) {
        match self.joined.events.recv().await {
            Some(event) => self.live(&event),
            None => {
                if self.joined.overflowed.load(Ordering::Acquire) {
                    let bounds = Bounds {
                        oldest: None,
                        newest: self.newest,
                    };
                    let frame = reset("slow_consumer", bounds, self.position);
                    self.pending.push_back(frame);
                }
                self.phase = Phase::Done;
            }
        }
    }

    fn live(&mut self, event: &Arc<Event>) {
        if event.seq <= self.position {
            return;
        }
        if event.seq > self.position + 1 {
            // The feed skipped events the history no longer keeps.
            let bounds = Bounds {
                oldest: Some(event.seq),
                newest: event.seq,
            };
            let resume = event.seq - 1;
            let frame = reset("expired", bounds, resume).id(resume.to_string());
            self.pending.push_back(frame);
        }
        self.frame(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(last_event_id: Option<u64>) -> Request {
        Request {
            tenant: "t".parse().expect("tenant"),
            topics: HashSet::new(),
            last_event_id,
            retry: std::time::Duration::from_secs(1),
        }
    }

    #[test]
    fn the_start_follows_the_clients_id_and_the_history() {
        let kept = Bounds {
            oldest: Some(5),
            newest: 10,
        };
        // No id: from now on.
        assert_eq!(start(&request(None), kept, 10).0, 10);
        // An id inside the history: exactly after it.
        let (position, frame) = start(&request(Some(4)), kept, 10);
        assert_eq!((position, frame.is_none()), (4, true));
        let (position, frame) = start(&request(Some(7)), kept, 10);
        assert_eq!((position, frame.is_none()), (7, true));
        // Older than what is kept: reset, resuming before the oldest kept.
        let (position, frame) = start(&request(Some(2)), kept, 10);
        assert_eq!((position, frame.is_some()), (4, true));
        // Never given: reset, from now on.
        let (position, frame) = start(&request(Some(99)), kept, 10);
        assert_eq!((position, frame.is_some()), (10, true));
        // Everything expired.
        let gone = Bounds {
            oldest: None,
            newest: 10,
        };
        let (position, frame) = start(&request(Some(3)), gone, 10);
        assert_eq!((position, frame.is_some()), (10, true));
    }
}
