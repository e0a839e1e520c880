//! The cluster's own addresses, which no delivery may reach even where `allowed-networks`
//! opens their network: the runners (as registered, so new ones are known within a
//! refresh), the gateway, Postgres and Redis as configured, and what the operator lists in
//! `[jobs.webhook] refused-addresses` (a load balancer in front of the gateways, say).
//!
//! They are judged by socket address (IP and port), so a receiver on the same host as a
//! runner is still reachable. A connection to an address that only `allowed-networks` lets
//! through refreshes the runner list first (at most one refresh at a time), so a runner
//! that registered a moment ago is already refused; other connections use the list of the
//! last [`STALE_AFTER`].

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use shoal::runner_storage::RunnerStorage;
use tokio::time::Instant;

/// Addresses kept at most (a cluster has far fewer).
const MAX_ADDRESSES: usize = 4096;
/// The longest a refresh waits for the runner list (a connection waits for the refresh).
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How old the list may be for a connection to a public address.
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// The cluster's own addresses (cheap to clone; clones share one list).
#[derive(Debug, Clone, Default)]
pub struct ClusterAddresses {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// `host:port` addresses from the configuration, resolved at each refresh.
    fixed: Vec<String>,
    runners: Option<Arc<dyn RunnerStorage>>,
    known: RwLock<Known>,
    refreshing: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Known {
    addresses: BTreeSet<SocketAddr>,
    at: Option<Instant>,
}

impl ClusterAddresses {
    /// The addresses `fixed` (`host:port`) and those of the runners registered in `runners`.
    pub fn new(fixed: Vec<String>, runners: Option<Arc<dyn RunnerStorage>>) -> Self {
        Self {
            inner: Arc::new(Inner {
                fixed,
                runners,
                known: RwLock::default(),
                refreshing: tokio::sync::Mutex::default(),
            }),
        }
    }

    /// Reads the runners and resolves every address again. On a storage error the runners
    /// known before are kept (the error is returned for the caller to log).
    pub async fn refresh(&self) -> Result<(), String> {
        let started = Instant::now();
        let _one = self.inner.refreshing.lock().await;
        if self.known_at().is_some_and(|at| at >= started) {
            return Ok(()); // Another caller refreshed while this one waited.
        }
        let mut names = self.inner.fixed.clone();
        let mut failed = None;
        if let Some(runners) = &self.inner.runners {
            match tokio::time::timeout(READ_TIMEOUT, runners.live_runners()).await {
                Ok(Ok(live)) => names.extend(live.into_iter().map(|r| r.address)),
                Ok(Err(error)) => failed = Some(error.to_string()),
                Err(_) => failed = Some(format!("no answer within {READ_TIMEOUT:?}")),
            }
        }
        let mut addresses = BTreeSet::new();
        for name in &names {
            for addr in resolve(name).await {
                if addresses.len() < MAX_ADDRESSES {
                    addresses.insert(addr);
                }
            }
        }
        let mut known = self.inner.known.write().unwrap_or_else(|e| e.into_inner());
        if failed.is_some() {
            // Keep the runners known before: a storage outage opens nothing.
            addresses.extend(known.addresses.iter().copied());
        }
        known.addresses = addresses;
        known.at = Some(Instant::now());
        metrics::gauge!("shoal_webhook_egress_cluster_addresses").set(known.addresses.len() as f64);
        failed.map_or(Ok(()), Err)
    }

    /// Whether `addr` is one of the cluster's; with `fresh` the runner list is read again
    /// first, otherwise only when older than [`STALE_AFTER`].
    pub async fn contains(&self, addr: SocketAddr, fresh: bool) -> bool {
        let stale = self.known_at().is_none_or(|at| at.elapsed() >= STALE_AFTER);
        if (fresh || stale)
            && let Err(error) = self.refresh().await
        {
            tracing::warn!(%error, "cannot read the runners the egress policy refuses");
        }
        let addr = canonical(addr);
        let known = self.inner.known.read().unwrap_or_else(|e| e.into_inner());
        known.addresses.contains(&addr)
    }

    /// How many addresses are refused as the cluster's.
    pub fn len(&self) -> usize {
        let known = self.inner.known.read().unwrap_or_else(|e| e.into_inner());
        known.addresses.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn known_at(&self) -> Option<Instant> {
        self.inner
            .known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .at
    }
}

/// `addr` with an IPv4-mapped IPv6 address as the IPv4 one.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// What `host:port` names; a listen address on every interface (`0.0.0.0`, `::`) stands for
/// its port on loopback too, the only interface known here.
async fn resolve(name: &str) -> Vec<SocketAddr> {
    let found: Vec<SocketAddr> = match tokio::net::lookup_host(name).await {
        Ok(found) => found.map(canonical).collect(),
        Err(error) => {
            tracing::debug!(%error, %name, "a cluster address does not resolve");
            return Vec::new();
        }
    };
    let mut out = Vec::with_capacity(found.len() + 2);
    for addr in found {
        if addr.ip().is_unspecified() {
            out.push(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                addr.port(),
            ));
            out.push(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::LOCALHOST),
                addr.port(),
            ));
        }
        out.push(addr);
    }
    out
}

/// The `host:port` of a database or Redis URL (`postgres://u@host:5432/db`), if it names
/// one; `default_port` when it names none.
pub fn url_address(url: &str, default_port: u16) -> Option<String> {
    let parsed = reqwest::Url::parse(url).ok()?;
    let host = parsed.host_str()?;
    if host.is_empty() {
        return None; // A Unix socket.
    }
    Some(format!("{host}:{}", parsed.port().unwrap_or(default_port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fixed_addresses_resolve_and_match_by_port() {
        let nodes = ClusterAddresses::new(
            vec!["127.0.0.1:7001".to_owned(), "0.0.0.0:8080".to_owned()],
            None,
        );
        let at = |text: &str| text.parse::<SocketAddr>().expect("an address");
        assert!(nodes.contains(at("127.0.0.1:7001"), false).await);
        assert!(nodes.contains(at("[::ffff:127.0.0.1]:7001"), false).await);
        assert!(!nodes.contains(at("127.0.0.1:7002"), false).await);
        assert!(nodes.contains(at("127.0.0.1:8080"), false).await);
        assert!(nodes.contains(at("[::1]:8080"), false).await);
        assert_eq!(
            url_address("postgres://postgres@db.internal/shoal", 5432).as_deref(),
            Some("db.internal:5432")
        );
        assert_eq!(
            url_address("redis://127.0.0.1:6380/0", 6379).as_deref(),
            Some("127.0.0.1:6380")
        );
    }
}
