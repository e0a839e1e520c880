//! A shard's backlog scans and its timer on the earliest scheduled message.
//!
//! A scan is a *pass* over the shard's due, unprocessed rows in id order, one page of
//! `scan_batch` rows at a time, each page after the last id of the one before (a cursor).
//! A pass ends at the first page that is not full; the cursor then starts over. So a pass
//! reads each row once, and a page the shard cannot deliver from (every row in flight,
//! young or just completed) is never read again in the same pass: the pass moves on to the
//! rows behind it. Requests for a scan while a pass runs start one more pass after it (the
//! rows that became deliverable may lie behind the cursor). Scans and rows read are counted
//! (`shoal_backlog_scans_total`, `shoal_backlog_scan_rows_total`).

use std::collections::HashSet;

use chrono::Utc;
use ractor::ActorRef;

use super::{Dispatch, ScanKind, ShardMsg, ShardState, Source};
use crate::entity_runtime::older_than;
use crate::ids::{EntityAddress, MessageId};
use crate::message_storage::StoredMessage;

/// Where the shard's scanning stands.
#[derive(Debug, Default)]
pub(super) struct ScanState {
    /// The current pass: its kind, and the last id of its previous page.
    kind: Option<ScanKind>,
    cursor: Option<MessageId>,
    /// Entities of this pass with a row left in storage: their later rows wait too.
    blocked: HashSet<EntityAddress>,
    /// Another pass was asked for while this one runs (the strongest kind asked).
    again: Option<ScanKind>,
}

impl ShardState {
    /// Starts a pass, or asks for one after the pass that runs.
    pub(super) fn request_scan(&mut self, myself: &ActorRef<ShardMsg>, kind: ScanKind) {
        if self.scan.kind.is_some() {
            self.scan.again = self.scan.again.max(Some(kind));
            return;
        }
        self.scan.kind = Some(kind);
        self.scan.cursor = None;
        self.scan.blocked.clear();
        self.read_page(myself);
    }

    fn read_page(&mut self, myself: &ActorRef<ShardMsg>) {
        let storage = self.shared.storage.clone();
        let (shard, after) = (self.shard, self.scan.cursor);
        let limit = self.shared.config.scan_batch;
        let myself = myself.clone();
        tokio::spawn(async move {
            let now = Utc::now();
            let result = async {
                let messages = storage.unprocessed_after(shard, now, after, limit).await?;
                crate::metrics::backlog_scanned(messages.len());
                // The due timer is armed once per pass, at its end.
                let next_due = if messages.len() < limit {
                    storage.next_due(shard, now).await?
                } else {
                    None
                };
                Ok::<_, crate::message_storage::MessageStorageError>((messages, next_due))
            }
            .await;
            let message = match result {
                Ok((messages, next_due)) => ShardMsg::Scanned { messages, next_due },
                Err(error) => ShardMsg::ScanFailed(error.to_string()),
            };
            let _ = myself.send_message(message);
        });
    }

    pub(super) fn scan_failed(&mut self, myself: &ActorRef<ShardMsg>, error: String) {
        tracing::warn!(shard = %self.shard, %error, "backlog scan failed");
        self.end_pass(myself);
    }

    pub(super) async fn scanned(
        &mut self,
        myself: &ActorRef<ShardMsg>,
        messages: Vec<StoredMessage>,
        next_due: Option<chrono::DateTime<Utc>>,
    ) {
        let kind = self.scan.kind.unwrap_or(ScanKind::Settled);
        let full = messages.len() >= self.shared.config.scan_batch;
        let last = messages.last().map(|m| m.id);
        let grace = self.shared.config.scan_grace;
        let mut redelivered = Vec::new();
        for message in messages {
            let entity = message.address.clone();
            if self.in_flight.contains(&message.id)
                || self.shared.recent.contains(message.id)
                || self.scan.blocked.contains(&entity)
            {
                continue;
            }
            // Young unscheduled messages are probably being pushed right now; leave them
            // unless the entity's backlog is only in storage.
            let young = message.deliver_at.is_none() && !older_than(message.id, grace);
            if kind == ScanKind::Settled && young && !self.overflowed.contains(&entity) {
                continue;
            }
            let id = message.id;
            match self.dispatch_persisted(myself, message, Source::Scan).await {
                Dispatch::Delivered => redelivered.push(id),
                Dispatch::Settled => {}
                Dispatch::Stays => {
                    self.scan.blocked.insert(entity);
                }
            }
        }
        if !redelivered.is_empty() {
            crate::metrics::messages_redelivered(redelivered.len());
            let storage = self.shared.storage.clone();
            tokio::spawn(async move {
                if let Err(error) = storage.record_attempts(&redelivered).await {
                    tracing::warn!(%error, "could not record delivery attempts");
                }
            });
        }
        if full && self.draining.is_none() {
            // The rows behind this page are different ones: go on, never back.
            self.scan.cursor = last;
            self.read_page(myself);
            return;
        }
        // The whole backlog was seen: overflowed entities not blocked in it have none left.
        if !full {
            let blocked = &self.scan.blocked;
            self.overflowed.retain(|e| blocked.contains(e));
        }
        if let Some(at) = next_due {
            self.arm_due_timer(myself, at);
        }
        self.end_pass(myself);
    }

    fn end_pass(&mut self, myself: &ActorRef<ShardMsg>) {
        self.scan.kind = None;
        self.scan.cursor = None;
        self.scan.blocked.clear();
        if let Some(kind) = self.scan.again.take()
            && self.draining.is_none()
        {
            self.request_scan(myself, kind);
        }
    }

    pub(super) fn arm_due_timer(&mut self, myself: &ActorRef<ShardMsg>, at: chrono::DateTime<Utc>) {
        if let Some((current, _)) = &self.due_timer
            && *current <= at
            && *current > Utc::now()
        {
            return;
        }
        if let Some((_, old)) = self.due_timer.take() {
            old.abort();
        }
        let wait = (at - Utc::now()).to_std().unwrap_or_default();
        let myself = myself.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = myself.send_message(ShardMsg::Scan(ScanKind::Settled));
        });
        self.due_timer = Some((at, timer));
    }
}
