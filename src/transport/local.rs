//! An in-process transport: runner addresses map to entity runtimes in this process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::{ENVELOPE_VERSION, Envelope, Transport, TransportError};
use crate::entity_runtime::EntityRuntime;
use crate::ids::EntityAddress;
use crate::message_storage::Reply;
use crate::transport::EntityStatus;

/// Routes envelopes to runtimes registered under an address.
#[derive(Debug, Clone, Default)]
pub struct LocalTransport {
    runtimes: Arc<Mutex<HashMap<String, EntityRuntime>>>,
}

impl LocalTransport {
    /// No runtimes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `runtime` reachable at `address`.
    pub fn add(&self, address: impl Into<String>, runtime: EntityRuntime) {
        self.runtimes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(address.into(), runtime);
    }

    fn runtime(&self, address: &str) -> Result<EntityRuntime, TransportError> {
        self.runtimes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(address)
            .cloned()
            .ok_or_else(|| TransportError::Unreachable {
                address: address.to_owned(),
                reason: "no such runner".to_owned(),
            })
    }

    /// Makes `address` unreachable (a dead runner).
    pub fn remove(&self, address: &str) {
        self.runtimes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(address);
    }
}

#[async_trait]
impl Transport for LocalTransport {
    async fn entity_status(
        &self,
        address: &str,
        entity: &EntityAddress,
    ) -> Result<EntityStatus, TransportError> {
        let runtime = self.runtime(address)?;
        Ok(runtime.entity_status(entity).await)
    }

    async fn deliver(
        &self,
        address: &str,
        envelope: Envelope,
        timeout: Duration,
    ) -> Result<Reply, TransportError> {
        if envelope.version != ENVELOPE_VERSION {
            return Err(TransportError::Protocol {
                address: address.to_owned(),
                reason: format!("unknown envelope version {}", envelope.version),
            });
        }
        let runtime = self.runtime(address)?;
        match tokio::time::timeout(timeout, runtime.deliver(envelope.into_delivery())).await {
            Ok(result) => result.map_err(TransportError::Delivery),
            Err(_) => Err(TransportError::Lost {
                address: address.to_owned(),
                reason: "timed out".to_owned(),
            }),
        }
    }
}
