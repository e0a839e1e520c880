//! The egress policy of webhook delivery: which addresses a delivery may connect to.
//!
//! A tenant chooses a webhook's URL, so without a policy a job aims the runner at whatever
//! the runner can reach: its own ports, the cluster's Postgres and Redis, a cloud's
//! metadata service at `169.254.169.254`. The policy refuses every address of the networks
//! in [`refusal`] (loopback, unspecified, link-local, private, CGNAT, multicast, broadcast,
//! reserved) unless the operator's `[jobs.webhook] allowed-networks` holds it.
//!
//! It judges the address a connection is made to, not the URL's text:
//! - A host name goes through [`EgressResolver`], the HTTP client's resolver, which drops
//!   refused addresses from the answer before the client sees it. The addresses checked are
//!   the ones connected to, so a name whose answer changes between a check and the
//!   connection (DNS rebinding) cannot get past it. A name left with no address fails the
//!   attempt with [`NameRefused`], without a connection.
//! - reqwest does not call the resolver for an IP literal, so [`EgressPolicy::check_url`]
//!   judges literals: at enqueue (a 400) and again before each attempt.
//! - An IPv6 address that carries an IPv4 one (IPv4-mapped `::ffff:a.b.c.d`,
//!   IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) is judged by the
//!   IPv4 address it carries. Decimal, octal and hex IPv4 forms (`http://2130706433/`,
//!   `http://0x7f.1/`) never reach the policy as names: the URL parser normalises them to
//!   dotted quads for `http` URLs (a test holds it to that).
//! - Last, [`guard`] judges the address each connection was made to, before a byte is
//!   written: the network policy again, and the cluster's own addresses ([`nodes`]), which
//!   are refused even inside an allowed network.

pub mod guard;
pub mod nodes;

pub use nodes::ClusterAddresses;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// An address the policy refuses, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{addr}{} is {reason}: refused by the egress policy (an operator allows a network with \
     `[jobs.webhook] allowed-networks`)",
    port.map(|p| format!(" port {p}")).unwrap_or_default()
)]
pub struct Refused {
    /// The address.
    pub addr: IpAddr,
    /// The port, where the refusal is of one port of the address.
    pub port: Option<u16>,
    /// The kind of network it is in (`loopback`, `private`, …).
    pub reason: &'static str,
}

/// Why one of the cluster's own addresses is refused.
pub const CLUSTER_ADDRESS: &str =
    "one of this cluster's own addresses (a runner, the gateway, Postgres or Redis)";

/// Why an address inside an allowed network is refused before the runner list was read.
pub const UNKNOWN_MEMBERSHIP: &str = "inside an allowed network while this runner cannot yet \
     read the cluster's runner list (it may be a runner's)";

impl Refused {
    fn cluster(addr: SocketAddr, reason: &'static str) -> Self {
        Self {
            addr: addr.ip(),
            port: Some(addr.port()),
            reason,
        }
    }

    /// A connection whose peer address is unknown (never made by the stock connector).
    fn unknown_peer() -> Self {
        Self {
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: None,
            reason: "a connection whose peer address is unknown",
        }
    }
}

/// A name that resolved to refused addresses only; the attempt made no connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{name}` resolves only to refused addresses ({refused})")]
pub struct NameRefused {
    /// The host name.
    pub name: String,
    /// The first refused address.
    pub refused: Refused,
}

/// The networks a delivery may reach although they are refused by default, and the
/// cluster's own addresses, which it never may.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    allowed: Vec<IpNet>,
    cluster: ClusterAddresses,
}

impl EgressPolicy {
    /// A policy that allows `allowed` beyond the public internet.
    pub fn new(allowed: Vec<IpNet>) -> Self {
        Self {
            allowed,
            cluster: ClusterAddresses::default(),
        }
    }

    /// The policy refusing `cluster` as well.
    pub fn with_cluster(mut self, cluster: ClusterAddresses) -> Self {
        self.cluster = cluster;
        self
    }

    /// Whether a connection made to `remote` may carry a request: the network policy, then
    /// the cluster's own addresses (read afresh for an address only an allowed network lets
    /// through).
    pub async fn check_connection(
        &self,
        remote: SocketAddr,
        local: Option<SocketAddr>,
    ) -> Result<(), Refused> {
        let addr = SocketAddr::new(remote.ip().to_canonical(), remote.port());
        self.check(addr.ip())?;
        let inside = refusal(addr.ip()).is_some();
        match self.cluster.membership(addr, local, inside).await {
            nodes::Membership::Outside => Ok(()),
            nodes::Membership::Cluster => Err(Refused::cluster(addr, CLUSTER_ADDRESS)),
            nodes::Membership::Unknown => Err(Refused::cluster(addr, UNKNOWN_MEMBERSHIP)),
        }
    }

    /// Whether a connection to `addr` is allowed.
    pub fn check(&self, addr: IpAddr) -> Result<(), Refused> {
        let Some(reason) = refusal(addr) else {
            return Ok(());
        };
        let carried = embedded_v4(addr).map(IpAddr::V4);
        let allowed = self
            .allowed
            .iter()
            .any(|net| net.contains(&addr) || carried.is_some_and(|v4| net.contains(&v4)));
        if allowed {
            Ok(())
        } else {
            Err(Refused {
                addr,
                port: None,
                reason,
            })
        }
    }

    /// Checks `url`'s host if it is an IP literal (a name is checked when it resolves).
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Refused> {
        match literal(url) {
            Some(addr) => self.check(addr),
            None => Ok(()),
        }
    }
}

/// `url`'s host if it is an IP literal (the parser has normalised numeric IPv4 forms).
pub fn literal(url: &reqwest::Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}

/// Why `addr` is refused by default, or `None` for a public address.
pub fn refusal(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(v4) => refusal_v4(v4),
        IpAddr::V6(v6) => refusal_v6(v6),
    }
}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)
}

/// The IPv4 networks refused by default, most specific first.
const REFUSED_V4: [(Ipv4Net, &str); 12] = [
    (v4(255, 255, 255, 255, 32), "broadcast"),
    (v4(0, 0, 0, 0, 8), "unspecified (\"this network\")"),
    (v4(127, 0, 0, 0, 8), "loopback"),
    (v4(10, 0, 0, 0, 8), "private"),
    (v4(172, 16, 0, 0, 12), "private"),
    (v4(192, 168, 0, 0, 16), "private"),
    (v4(100, 64, 0, 0, 10), "shared address space (CGNAT)"),
    (v4(169, 254, 0, 0, 16), "link-local"),
    (v4(192, 0, 0, 0, 24), "reserved (IETF protocol assignments)"),
    (v4(198, 18, 0, 0, 15), "reserved (benchmarking)"),
    (v4(224, 0, 0, 0, 4), "multicast"),
    (v4(240, 0, 0, 0, 4), "reserved"),
];

const fn v6(first: u16, len: u8) -> Ipv6Net {
    Ipv6Net::new_assert(Ipv6Addr::new(first, 0, 0, 0, 0, 0, 0, 0), len)
}

/// The IPv6 networks refused by default (beyond those carrying an IPv4 address).
const REFUSED_V6: [(Ipv6Net, &str); 4] = [
    (v6(0xfe80, 10), "link-local"),
    (v6(0xfec0, 10), "site-local"),
    (v6(0xfc00, 7), "private (unique local)"),
    (v6(0xff00, 8), "multicast"),
];

fn refusal_v4(addr: Ipv4Addr) -> Option<&'static str> {
    REFUSED_V4
        .iter()
        .find(|(net, _)| net.contains(&addr))
        .map(|(_, reason)| *reason)
}

fn refusal_v6(addr: Ipv6Addr) -> Option<&'static str> {
    if addr.is_unspecified() {
        return Some("unspecified");
    }
    if addr.is_loopback() {
        return Some("loopback");
    }
    if let Some(carried) = embedded_v4(IpAddr::V6(addr)) {
        // ::a.b.c.d (IPv4-compatible) is deprecated and never routed: refused whatever
        // it carries.
        let compatible = addr.segments()[..6].iter().all(|s| *s == 0);
        return refusal_v4(carried).or(compatible.then_some("IPv4-compatible (deprecated)"));
    }
    REFUSED_V6
        .iter()
        .find(|(net, _)| net.contains(&addr))
        .map(|(_, reason)| *reason)
}

/// The IPv4 address an IPv6 address carries and that a connection to it may reach:
/// IPv4-mapped, IPv4-compatible, NAT64 (well-known prefix) or 6to4.
pub(crate) fn embedded_v4(addr: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = addr else {
        return None;
    };
    let s = v6.segments();
    let low = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => Some(low(hi, lo)),
        [0, 0, 0, 0, 0, 0, hi, lo] if !v6.is_unspecified() && !v6.is_loopback() => {
            Some(low(hi, lo))
        }
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(low(hi, lo)),
        [0x2002, hi, lo, ..] => Some(low(hi, lo)),
        _ => None,
    }
}

/// The HTTP client's resolver: the system's answer without the addresses the policy
/// refuses (see the module's documentation).
#[derive(Debug, Clone)]
pub struct EgressResolver {
    policy: Arc<EgressPolicy>,
}

impl EgressResolver {
    /// A resolver that applies `policy`.
    pub fn new(policy: Arc<EgressPolicy>) -> Self {
        Self { policy }
    }
}

impl Resolve for EgressResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = Arc::clone(&self.policy);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut first_refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|addr| match policy.check(addr.ip()) {
                    Ok(()) => true,
                    Err(refused) => {
                        first_refused.get_or_insert(refused);
                        false
                    }
                })
                .collect();
            match first_refused {
                Some(refused) if allowed.is_empty() => Err(Box::new(NameRefused {
                    name: host,
                    refused,
                })
                    as Box<dyn std::error::Error + Send + Sync>),
                _ => Ok(Box::new(allowed.into_iter()) as Addrs),
            }
        })
    }
}

/// The [`NameRefused`] somewhere in `error`'s sources, if a refusal caused it.
pub fn name_refused<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a NameRefused> {
    cause(error)
}

/// The [`Refused`] connection somewhere in `error`'s sources, if the guard refused it.
pub fn connection_refused<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    cause(error)
}

fn cause<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(found) = error.downcast_ref::<T>() {
            return Some(found);
        }
        cause = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn internal_addresses_are_refused_and_public_ones_pass() {
        let policy = EgressPolicy::default();
        for (addr, reason) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "CGNAT"),
            ("169.254.169.254", "link-local"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("240.0.0.1", "reserved"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fe80::1", "link-local"),
            ("fc00::1", "private"),
            ("fd12:3456::1", "private"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:0.0.0.0", "unspecified"),
            ("::127.0.0.1", "loopback"),
            ("::8.8.8.8", "IPv4-compatible"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("2002:7f00:1::", "loopback"),
        ] {
            let refused = policy.check(ip(addr)).expect_err(addr);
            assert!(refused.reason.contains(reason), "{addr}: {refused}");
        }
        for addr in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert_eq!(policy.check(ip(addr)), Ok(()), "{addr}");
        }
    }

    #[test]
    fn allowed_networks_open_what_they_name_and_nothing_else() {
        let policy = EgressPolicy::new(vec!["127.0.0.0/8".parse().expect("a network")]);
        assert_eq!(policy.check(ip("127.0.0.1")), Ok(()));
        assert_eq!(policy.check(ip("::ffff:127.0.0.1")), Ok(()), "mapped form");
        assert!(policy.check(ip("::1")).is_err(), "IPv6 loopback not named");
        assert!(policy.check(ip("10.0.0.1")).is_err());
    }

    #[test]
    fn the_url_parser_normalises_numeric_ipv4_forms_to_literals() {
        let policy = EgressPolicy::default();
        for text in [
            "http://2130706433:8080/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://017700000001/",
            "http://127.1/",
            "http://0/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[0:0:0:0:0:ffff:127.0.0.1]/",
            "http://LOCALHOST.:1/x",
        ] {
            let url = reqwest::Url::parse(text).expect(text);
            let literal = literal(&url).is_some();
            if text.contains("LOCALHOST") {
                // A name: the resolver judges its addresses.
                assert!(!literal, "{text} → {url}");
                continue;
            }
            assert!(literal, "{text} → {url}: a literal");
            assert!(policy.check_url(&url).is_err(), "{text} → {url}");
        }
        assert_eq!(
            reqwest::Url::parse("http://2130706433/")
                .expect("a url")
                .host_str(),
            Some("127.0.0.1")
        );
    }

    proptest! {
        #[test]
        fn an_ipv4_address_and_its_mapped_forms_get_the_same_answer(raw: u32) {
            let policy = EgressPolicy::default();
            let addr = Ipv4Addr::from(raw);
            let plain = policy.check(IpAddr::V4(addr)).is_ok();
            let mapped = IpAddr::V6(addr.to_ipv6_mapped());
            prop_assert_eq!(policy.check(mapped).is_ok(), plain);
            let [a, b, c, d] = addr.octets();
            let nat64 = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0,
                u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]));
            prop_assert_eq!(policy.check(IpAddr::V6(nat64)).is_ok(), plain);
            // An allowed network in the IPv4 form opens the mapped form too.
            let open = EgressPolicy::new(vec![IpNet::V4(Ipv4Net::new_assert(addr, 32))]);
            prop_assert!(open.check(mapped).is_ok());
        }

        #[test]
        fn a_private_ipv4_address_is_refused_in_every_form(host in 0u32..(1 << 24)) {
            let addr = Ipv4Addr::from((10u32 << 24) | host);
            let policy = EgressPolicy::default();
            for form in [
                IpAddr::V4(addr),
                IpAddr::V6(addr.to_ipv6_mapped()),
                IpAddr::V6(addr.to_ipv6_compatible()),
            ] {
                prop_assert!(policy.check(form).is_err(), "{}", form);
            }
            let text = format!("http://{}/", u32::from(addr));
            let url = reqwest::Url::parse(&text).expect("a url");
            prop_assert!(policy.check_url(&url).is_err(), "{} → {}", text, url);
        }
    }
}
