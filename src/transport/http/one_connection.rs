//! A connector layer that lets a peer's client make one TCP connection and no other.
//!
//! hyper reconnects on its own when a pooled connection closes (a keep-alive timeout to a
//! frozen runner, a GOAWAY), and a delivery would then be written into a connection no
//! hello has proven (see `peer::Link::establish`). With this layer that second connect
//! fails as a connect error instead: the delivery is `Unreachable` (nothing was sent),
//! the link retires the client, and the next delivery opens a new one behind a hello.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

/// The error of a second connect.
#[derive(Debug, thiserror::Error)]
#[error("the connection to this runner closed; the next delivery opens a new one")]
pub(super) struct Reconnect;

/// Wraps a client's connector in [`Once`].
#[derive(Debug, Clone, Default)]
pub(super) struct OneConnection {
    made: Arc<AtomicBool>,
}

impl<S> tower::Layer<S> for OneConnection {
    type Service = Once<S>;

    fn layer(&self, inner: S) -> Once<S> {
        Once {
            inner,
            made: Arc::clone(&self.made),
        }
    }
}

/// A connector that connects once.
#[derive(Debug, Clone)]
pub(super) struct Once<S> {
    inner: S,
    made: Arc<AtomicBool>,
}

impl<S, R> tower::Service<R> for Once<S>
where
    S: tower::Service<R>,
    S::Response: Send + 'static,
    S::Error: From<Reconnect> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        if self.made.swap(true, Ordering::SeqCst) {
            return Box::pin(std::future::ready(Err(Reconnect.into())));
        }
        Box::pin(self.inner.call(request))
    }
}
