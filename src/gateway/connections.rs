//! What one client can hold of the gateway's connections: at most
//! `gateway.max-connections` in all (accepting pauses at the cap) and
//! `gateway.max-connections-per-client` from one IP address (more are closed at once), and a
//! connection must finish its first request's head within `gateway.header-read-timeout`
//! (a slowloris that sends headers without end is closed). HTTP/2's preface ends like a
//! request head, so an h2c connection passes at once. Idle keep-alive connections stay
//! bounded by the per-client cap.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The caps a [`GuardedListener`] enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    pub(crate) total: usize,
    pub(crate) per_client: usize,
    pub(crate) header_read_timeout: Duration,
}

/// A listener whose connections obey [`ConnectionLimits`].
#[derive(Debug)]
pub(crate) struct GuardedListener {
    inner: TcpListener,
    limits: ConnectionLimits,
    total: Arc<Semaphore>,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl GuardedListener {
    pub(crate) fn new(inner: TcpListener, limits: ConnectionLimits) -> Self {
        Self {
            inner,
            total: Arc::new(Semaphore::new(limits.total.max(1))),
            per_client: Arc::default(),
            limits,
        }
    }

    /// Counts a connection from `ip`, unless it has its cap already.
    fn admit(&self, ip: IpAddr) -> Option<ClientSlot> {
        let mut clients = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        let held = clients.entry(ip).or_default();
        if *held >= self.limits.per_client {
            return None;
        }
        *held += 1;
        Some(ClientSlot {
            ip,
            clients: self.per_client.clone(),
        })
    }
}

/// One connection's place in the per-client count, given back when it closes. The map
/// holds only clients with a connection open, so it is bounded by the total cap.
#[derive(Debug)]
struct ClientSlot {
    ip: IpAddr,
    clients: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = clients.get_mut(&self.ip) {
            *held -= 1;
            if *held == 0 {
                clients.remove(&self.ip);
            }
        }
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = GuardedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // At the total cap, accepting waits: new clients queue in the kernel's backlog.
            let Ok(permit) = self.total.clone().acquire_owned().await else {
                std::future::pending::<()>().await;
                unreachable!("the semaphore is never closed");
            };
            let (stream, addr) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait, as axum's own loop does.
                    tracing::debug!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = self.admit(addr.ip()) else {
                crate::metrics::gateway_connection_refused("per_client");
                tracing::debug!(client = %addr.ip(), "per-client connection cap reached; closing");
                continue; // Dropping the stream closes it.
            };
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "cannot turn Nagle's algorithm off");
            }
            let head_deadline = Box::pin(tokio::time::sleep(self.limits.header_read_timeout));
            return (
                GuardedStream {
                    inner: stream,
                    head_deadline: Some(head_deadline),
                    tail: [0; 3],
                    _permit: permit,
                    _slot: slot,
                },
                addr,
            );
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted connection: its caps' places, and the deadline for its first request head.
#[derive(Debug)]
pub(crate) struct GuardedStream {
    inner: TcpStream,
    /// Until the first `\r\n\r\n` has been read.
    head_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The last bytes read, so an end of head split across reads is seen.
    tail: [u8; 3],
    _permit: OwnedSemaphorePermit,
    _slot: ClientSlot,
}

/// Whether `bytes`, after `tail` (the three bytes before them), hold `\r\n\r\n`; updates
/// `tail`.
fn ends_head(tail: &mut [u8; 3], bytes: &[u8]) -> bool {
    let mut window: Vec<u8> = Vec::with_capacity(3 + bytes.len());
    window.extend_from_slice(tail);
    window.extend_from_slice(bytes);
    let found = window.windows(4).any(|w| w == b"\r\n\r\n");
    let keep = window.len().min(3);
    tail.copy_from_slice(&{
        let mut last = [0u8; 3];
        last[3 - keep..].copy_from_slice(&window[window.len() - keep..]);
        last
    });
    found
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(deadline) = this.head_deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            crate::metrics::gateway_connection_refused("header_read_timeout");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the request head did not arrive within gateway.header-read-timeout",
            )));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.head_deadline.is_some()
            && let Poll::Ready(Ok(())) = &polled
            && ends_head(&mut this.tail, &buf.filled()[before..])
        {
            this.head_deadline = None;
        }
        polled
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::ends_head;

    #[test]
    fn the_end_of_a_head_is_found_however_the_bytes_are_split() {
        let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody";
        for cut in 0..head.len() {
            let mut tail = [0; 3];
            let first = ends_head(&mut tail, &head[..cut]);
            let second = ends_head(&mut tail, &head[cut..]);
            assert!(first || second, "cut at {cut}");
        }
        let mut tail = [0; 3];
        assert!(!ends_head(&mut tail, b"GET / HTTP/1.1\r\nX-A: 1\r\n"));
        assert!(!ends_head(&mut tail, b"X-B: 2\r\n"));
        assert!(ends_head(&mut tail, b"\r\n"));
    }
}
