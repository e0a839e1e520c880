//! The last check before a webhook request is written: a layer over the HTTP client's
//! connector that judges the address the connection was actually made to (after DNS, after
//! any literal), against the network policy and the cluster's own addresses. A refused
//! connection is dropped before a byte is sent.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::Extensions;
use hyper_util::client::legacy::connect::{Connection, HttpInfo};

use super::{EgressPolicy, Refused};

/// Wraps the client's connector in [`Guard`].
#[derive(Debug, Clone)]
pub struct GuardLayer {
    policy: Arc<EgressPolicy>,
}

impl GuardLayer {
    /// A layer that applies `policy` to every connection.
    pub fn new(policy: Arc<EgressPolicy>) -> Self {
        Self { policy }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            policy: Arc::clone(&self.policy),
        }
    }
}

/// A connector whose connections are judged by [`EgressPolicy::check_connection`].
#[derive(Debug, Clone)]
pub struct Guard<S> {
    inner: S,
    policy: Arc<EgressPolicy>,
}

impl<S, R> tower::Service<R> for Guard<S>
where
    S: tower::Service<R>,
    S::Response: Connection + Send + 'static,
    S::Error: From<Refused> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let connecting = self.inner.call(request);
        let policy = Arc::clone(&self.policy);
        Box::pin(async move {
            let connection = connecting.await?;
            let (remote, local) = addresses(&connection).ok_or_else(Refused::unknown_peer)?;
            policy.check_connection(remote, Some(local)).await?;
            Ok(connection)
        })
    }
}

/// The addresses a connection reached and came from, as its connector recorded them.
fn addresses(connection: &impl Connection) -> Option<(SocketAddr, SocketAddr)> {
    let mut extensions = Extensions::new();
    connection.connected().get_extras(&mut extensions);
    extensions
        .get::<HttpInfo>()
        .map(|info| (info.remote_addr(), info.local_addr()))
}
