//! The cluster's own addresses, which no delivery may reach even where `allowed-networks`
//! opens their network: the runners (as registered, so new ones are known within a
//! refresh), the gateway, Postgres and Redis as configured, and what the operator lists in
//! `[jobs.webhook] refused-addresses` (a load balancer in front of the gateways, say).
//!
//! They are judged by socket address (IP and port), so a receiver on the same host as a
//! runner is still reachable. Every loopback address (`127.0.0.0/8`, `::1`) is one host,
//! an IPv6 form carrying an IPv4 address is that address, and a listen address on every
//! interface (`0.0.0.0:8080`) refuses its port on any address of this host (loopback, or
//! the address the connection came from). A connection to an address that only
//! `allowed-networks` lets through reads the runner list afresh first (one read at a
//! time); until one read has succeeded such a connection is refused, since nobody can
//! tell whether it is a runner's. Other connections use the list of the last
//! [`STALE_AFTER`]. A name that does not resolve keeps the addresses it had.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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

/// What the list says of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// Not one of the cluster's addresses.
    Outside,
    /// One of them.
    Cluster,
    /// Inside an allowed network while the runner list has never been read.
    Unknown,
}

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
    /// Folded (see [`fold`]).
    addresses: BTreeSet<SocketAddr>,
    /// Ports listened on at every interface of this host.
    any_interface: BTreeSet<u16>,
    /// Each name's last successful resolution.
    resolved: HashMap<String, Vec<SocketAddr>>,
    /// Whether the runner list was read at least once.
    runners_read: bool,
    /// When the last refresh started.
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
            return Ok(()); // Another caller's refresh started after this one asked.
        }
        let started = Instant::now();
        let mut names = self.inner.fixed.clone();
        let mut failed = None;
        if let Some(runners) = &self.inner.runners {
            match tokio::time::timeout(READ_TIMEOUT, runners.live_runners()).await {
                Ok(Ok(live)) => names.extend(live.into_iter().map(|r| r.address)),
                Ok(Err(error)) => failed = Some(error.to_string()),
                Err(_) => failed = Some(format!("no answer within {READ_TIMEOUT:?}")),
            }
        }
        let mut found = Vec::with_capacity(names.len());
        for name in &names {
            found.push((name.clone(), tokio::net::lookup_host(name.as_str()).await));
        }
        let mut known = self.inner.known.write().unwrap_or_else(|e| e.into_inner());
        let mut addresses = BTreeSet::new();
        let mut any_interface = BTreeSet::new();
        for (name, result) in found {
            let resolved: Vec<SocketAddr> = match result {
                Ok(addrs) => addrs.collect(),
                Err(error) => {
                    tracing::warn!(%error, %name, "a cluster address does not resolve; its last addresses stay refused");
                    known.resolved.get(&name).cloned().unwrap_or_default()
                }
            };
            for addr in &resolved {
                if addr.ip().is_unspecified() {
                    any_interface.insert(addr.port());
                } else if addresses.len() < MAX_ADDRESSES {
                    addresses.insert(fold(*addr));
                }
            }
            known.resolved.insert(name, resolved);
        }
        if failed.is_some() {
            // Keep the runners known before: a storage outage opens nothing.
            addresses.extend(known.addresses.iter().copied());
        } else if self.inner.runners.is_some() {
            known.runners_read = true;
        }
        known.resolved.retain(|name, _| names.contains(name));
        known.addresses = addresses;
        known.any_interface = any_interface;
        known.at = Some(started);
        metrics::gauge!("shoal_webhook_egress_cluster_addresses").set(known.addresses.len() as f64);
        failed.map_or(Ok(()), Err)
    }

    /// Whether a connection from `local` to `remote` reaches one of the cluster's
    /// addresses; with `fresh` (an address only an allowed network lets through) the
    /// runner list is read again first, otherwise only when older than [`STALE_AFTER`].
    pub async fn membership(
        &self,
        remote: SocketAddr,
        local: Option<SocketAddr>,
        fresh: bool,
    ) -> Membership {
        let stale = self.known_at().is_none_or(|at| at.elapsed() >= STALE_AFTER);
        if (fresh || stale)
            && let Err(error) = self.refresh().await
        {
            tracing::warn!(%error, "cannot read the runners the egress policy refuses");
        }
        let known = self.inner.known.read().unwrap_or_else(|e| e.into_inner());
        let folded = fold(remote);
        let this_host = folded.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST)
            || local.is_some_and(|local| fold(local).ip() == folded.ip());
        if known.addresses.contains(&folded)
            || (this_host && known.any_interface.contains(&remote.port()))
        {
            Membership::Cluster
        } else if fresh && self.inner.runners.is_some() && !known.runners_read {
            Membership::Unknown
        } else {
            Membership::Outside
        }
    }

    /// How many addresses are refused as the cluster's.
    pub fn len(&self) -> usize {
        let known = self.inner.known.read().unwrap_or_else(|e| e.into_inner());
        known.addresses.len() + known.any_interface.len()
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

/// `addr` as the list keys it: an IPv6 form carrying an IPv4 address is that address,
/// and every loopback address is `127.0.0.1`.
fn fold(addr: SocketAddr) -> SocketAddr {
    let ip = addr.ip().to_canonical();
    let ip = super::embedded_v4(ip).map_or(ip, IpAddr::V4);
    let ip = if ip.is_loopback() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        ip
    };
    SocketAddr::new(ip, addr.port())
}

/// The `host:port` of a database or Redis URL (`postgres://u@host:5432/db`, or a `host`
/// query parameter), if it names a TCP host; `default_port` when it names no port.
pub fn url_address(url: &str, default_port: u16) -> Option<String> {
    let parsed = reqwest::Url::parse(url).ok()?;
    let from_query = || {
        parsed
            .query_pairs()
            .find(|(key, _)| key == "host")
            .map(|(_, host)| host.into_owned())
    };
    let host = match parsed.host_str() {
        Some(host) if !host.is_empty() => host.to_owned(),
        _ => from_query()?,
    };
    if host.starts_with('/') {
        return None; // A Unix socket.
    }
    Some(format!("{host}:{}", parsed.port().unwrap_or(default_port)))
}

/// Checks that `entry` of `[jobs.webhook] refused-addresses` is `host:port`.
pub fn check_entry(entry: &str) -> Result<(), String> {
    match entry.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!(
            "jobs.webhook.refused-addresses: `{entry}` is not `host:port`"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> SocketAddr {
        text.parse().expect("an address")
    }

    #[tokio::test]
    async fn addresses_match_by_port_on_any_form_of_the_host() {
        let nodes = ClusterAddresses::new(
            vec!["127.0.0.1:7001".to_owned(), "0.0.0.0:8080".to_owned()],
            None,
        );
        let member = |remote: &str, local: Option<&str>| {
            let nodes = nodes.clone();
            let (remote, local) = (at(remote), local.map(at));
            async move { nodes.membership(remote, local, false).await }
        };
        for remote in [
            "127.0.0.1:7001",
            "127.0.0.2:7001",
            "[::ffff:127.0.0.1]:7001",
            "[::1]:7001",
            "127.0.0.1:8080",
            "127.9.9.9:8080",
            "[::1]:8080",
        ] {
            assert_eq!(member(remote, None).await, Membership::Cluster, "{remote}");
        }
        assert_eq!(member("127.0.0.1:7002", None).await, Membership::Outside);
        // Port 8080 on every interface: this host's own address too, not another host's.
        assert_eq!(
            member("10.1.2.3:8080", Some("10.1.2.3:50000")).await,
            Membership::Cluster
        );
        assert_eq!(
            member("10.1.2.4:8080", Some("10.1.2.3:50000")).await,
            Membership::Outside
        );
    }

    #[test]
    fn urls_and_entries() {
        assert_eq!(
            url_address("postgres://postgres@db.internal/shoal", 5432).as_deref(),
            Some("db.internal:5432")
        );
        assert_eq!(
            url_address("redis://127.0.0.1:6380/0", 6379).as_deref(),
            Some("127.0.0.1:6380")
        );
        assert_eq!(
            url_address("postgres:///shoal?host=10.0.0.7", 5432).as_deref(),
            Some("10.0.0.7:5432")
        );
        assert_eq!(url_address("postgres:///shoal?host=/run/pg", 5432), None);
        assert!(check_entry("lb.internal:443").is_ok());
        assert!(check_entry("[::1]:80").is_ok());
        assert!(check_entry("lb.internal").is_err());
        assert!(check_entry(":80").is_err());
    }
}
