//! Where things are served, by address: the hosts of features (resolved on demand and cached),
//! and the one tie of names to addresses made from them ([`AddressGate`]: a name reaches no
//! address of a feature it does not belong to); and the proxy's own listeners (so a connection
//! to one of them is known for a loop).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::active::Active;
use crate::decide::policy::{canonical, HostPattern, Policy};
use crate::upstream::{AddressCheck, ConnectError};

/// How long resolved feature-host addresses are trusted.
const ADDR_TTL: Duration = Duration::from_secs(300);
/// How many host names the address cache holds before it starts afresh.
const ADDR_CACHE_MAX: usize = 4096;

/// Addresses of feature hosts, resolved on demand and cached (bounded, with a lifetime), to see
/// whether a destination belongs to a feature whatever name the client gives: what DNS says
/// (that address on any port: the same operator), and `[upstream] resolve` (that address and
/// port only, as the admin pinned it).
#[derive(Default)]
struct FeatureAddrs {
    cache: Mutex<HashMap<String, (Vec<SocketAddr>, Instant)>>,
}

impl FeatureAddrs {
    /// The features one of whose (exact) hosts is served at `dest`. Hosts not cached (or stale)
    /// are looked up together, so one slow resolver costs one timeout, not one per host.
    pub(super) async fn features_at(
        &self,
        policy: &Policy,
        overrides: &HashMap<String, SocketAddr>,
        dest: SocketAddr,
    ) -> Vec<String> {
        let hosts: Vec<(&str, &str)> = policy
            .features
            .iter()
            .flat_map(|f| f.hosts.iter().map(move |h| (f.name.as_str(), h)))
            .filter_map(|(feature, h)| match h {
                HostPattern::Exact(host) => Some((feature, host.as_str())),
                HostPattern::Subdomain(_) => None,
            })
            .collect();
        let stale: Vec<String> = {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            hosts
                .iter()
                .filter(|(_, host)| {
                    cache
                        .get(*host)
                        .is_none_or(|(_, at)| at.elapsed() >= ADDR_TTL)
                })
                .map(|(_, host)| host.to_string())
                .collect()
        };
        let mut lookups = tokio::task::JoinSet::new();
        for host in stale {
            lookups.spawn(async move {
                // A failed or slow lookup finds nothing; the next check tries again after the TTL.
                let lookup = tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio::net::lookup_host((host.clone(), 0)),
                )
                .await;
                // Port 0: the feature's operator is at that address on every port.
                let found: Vec<SocketAddr> = match lookup {
                    Ok(Ok(addrs)) => addrs
                        .map(|a| SocketAddr::new(canonical(a.ip()), 0))
                        .collect(),
                    _ => Vec::new(),
                };
                (host, found)
            });
        }
        while let Some(Ok((host, mut found))) = lookups.join_next().await {
            found.extend(
                [443, 80]
                    .iter()
                    .filter_map(|port| overrides.get(&format!("{host}:{port}"))),
            );
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= ADDR_CACHE_MAX {
                cache.clear();
            }
            cache.insert(host, (found, Instant::now()));
        }
        let ip = canonical(dest.ip());
        let serves = |a: &SocketAddr| a.ip() == ip && (a.port() == 0 || a.port() == dest.port());
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let mut at: Vec<String> = Vec::new();
        for (feature, host) in &hosts {
            let served = cache
                .get(*host)
                .is_some_and(|(addrs, _)| addrs.iter().any(serves));
            if served && !at.iter().any(|f| f == feature) {
                at.push(feature.to_string());
            }
        }
        at
    }
}

/// The one tie of names to addresses, for every listener and request form: a name may be
/// reached at an address unless the address serves a feature the name does not belong to (a
/// name of no feature at a feature host's address, an alias or a numeric spelling of one, a
/// `Host` of one feature on a connection to another's). Checked after resolution and before
/// anything is sent: by the upstream dialer for pooled requests and tunnels, and for each
/// request on a pinned (transparent) connection.
pub(super) struct AddressGate {
    active: watch::Receiver<Arc<Active>>,
    addrs: FeatureAddrs,
    /// `[upstream] resolve`, also consulted for the addresses of feature hosts.
    overrides: HashMap<String, SocketAddr>,
}

impl AddressGate {
    pub(super) fn new(
        active: watch::Receiver<Arc<Active>>,
        overrides: HashMap<String, SocketAddr>,
    ) -> Self {
        AddressGate {
            active,
            addrs: FeatureAddrs::default(),
            overrides,
        }
    }

    /// `Err(feature)`: `addr` serves `feature`, and `host` (`None`: no name) is not one of its
    /// hosts (nor of another feature served there).
    pub(super) async fn admit(&self, host: Option<&str>, addr: SocketAddr) -> Result<(), String> {
        let active = self.active.borrow().clone();
        let policy = &active.policy;
        let at = self.addrs.features_at(policy, &self.overrides, addr).await;
        let Some(first) = at.first() else {
            return Ok(());
        };
        let named = |feature: &String| {
            host.is_some_and(|h| policy.features_on(h).any(|f| &f.name == feature))
        };
        if at.iter().any(named) {
            Ok(())
        } else {
            Err(first.clone())
        }
    }
}

impl AddressCheck for AddressGate {
    fn check<'a>(
        &'a self,
        host: &'a str,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Result<(), ConnectError>> + Send + 'a>> {
        Box::pin(async move {
            // A feature's own name, resolved by the proxy, is where the admin's DNS says that
            // feature is: only other names (of no feature: aliases, numeric spellings, literals)
            // can be steered by the client to a feature's address.
            if self
                .active
                .borrow()
                .policy
                .features_on(host)
                .next()
                .is_some()
            {
                return Ok(());
            }
            self.admit(Some(host), addr)
                .await
                .map_err(ConnectError::FeatureAddress)
        })
    }
}

/// The proxy's own listening addresses.
#[derive(Debug)]
pub(super) struct Listening(pub(super) Vec<SocketAddr>);

impl Listening {
    /// Whether some listener is on `port`.
    pub(super) fn on_port(&self, port: u16) -> bool {
        self.0.iter().any(|own| own.port() == port)
    }

    /// Whether `addr` is one of the proxy's own listeners: the bound address itself, or, for a
    /// wildcard bind, any address of this host on that port.
    pub(super) fn includes(&self, addr: SocketAddr) -> bool {
        let ip = canonical(addr.ip());
        self.0.iter().any(|own| {
            own.port() == addr.port()
                && (canonical(own.ip()) == ip || (own.ip().is_unspecified() && is_local(ip)))
        })
    }
}

/// Whether `ip` is an address of this host: loopback, unspecified, or on an interface.
fn is_local(ip: IpAddr) -> bool {
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    let Ok(interfaces) = nix::ifaddrs::getifaddrs() else {
        return false;
    };
    interfaces
        .filter_map(|i| i.address)
        .any(|a| match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
            (Some(v4), _) => IpAddr::V4(v4.ip()) == ip,
            (_, Some(v6)) => canonical(IpAddr::V6(v6.ip())) == ip,
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two features of our own at addresses of their own (by `[upstream] resolve`, as the
    /// gate reads them), over the pack.
    const POLICY: &str = r#"
[consent]
a = "granted"
b = "denied"
[[feature]]
name = "a"
hosts = ["a.example"]
[[feature]]
name = "b"
hosts = ["b.example", "b-alias.example"]
[upstream]
resolve = { "a.example:443" = "10.0.0.1:443", "b.example:443" = "10.0.0.2:443" }
"#;

    #[tokio::test]
    async fn a_name_reaches_only_its_own_features_addresses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = crate::config::load_str("p.toml", POLICY, dir.path()).expect("loads");
        let resolve = config.upstream.resolve.clone();
        let active = watch::Sender::new(Active::new(config.policy, "p", "c"));
        let gate = AddressGate::new(active.subscribe(), resolve);
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:443".parse().expect("addr"),
            "10.0.0.2:443".parse().expect("addr"),
        );
        for (host, addr, want) in [
            (Some("a.example"), a, Ok(())),
            (Some("A.Example."), a, Ok(())),
            (Some("b-alias.example"), b, Ok(())),
            // A Host of one feature on a connection to another's address (transparent mode).
            (Some("b.example"), a, Err("a")),
            (Some("a.example"), b, Err("b")),
            // Names of no feature, or none, at a feature's address.
            (Some("elsewhere.example"), b, Err("b")),
            (Some("[::ffff:10.0.0.2]"), b, Err("b")),
            (None, a, Err("a")),
            // Anywhere else, any name goes (the plan decides it).
            (
                Some("b.example"),
                "10.0.0.3:443".parse().expect("addr"),
                Ok(()),
            ),
            (
                Some("a.example"),
                "10.0.0.1:8443".parse().expect("addr"),
                Ok(()),
            ),
        ] {
            let got = gate.admit(host, addr).await;
            assert_eq!(got, want.map_err(str::to_string), "{host:?} at {addr}");
        }
        // The dialer's check trusts the proxy's own resolution of a feature's name only.
        assert!(gate.check("a.example", b).await.is_ok());
        assert!(matches!(
            gate.check("elsewhere.example", a).await,
            Err(ConnectError::FeatureAddress(f)) if f == "a"
        ));
    }
}
