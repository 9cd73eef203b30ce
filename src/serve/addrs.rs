//! Where things are served, by address: the hosts of features (resolved on demand and cached,
//! so a name of no feature cannot reach a feature host's address), and the proxy's own
//! listeners (so a connection to one of them is known for a loop).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::decide::policy::{canonical, HostPattern, Policy};

/// How long resolved feature-host addresses are trusted.
const ADDR_TTL: Duration = Duration::from_secs(300);
/// How many host names the address cache holds before it starts afresh.
const ADDR_CACHE_MAX: usize = 4096;

/// Addresses of feature hosts (`[upstream] resolve`, then DNS on port 443), resolved on demand
/// and cached (bounded, with a lifetime), to see whether a destination belongs to a feature
/// whatever name the client gives.
#[derive(Default)]
pub(super) struct FeatureAddrs {
    cache: Mutex<HashMap<String, (Vec<SocketAddr>, Instant)>>,
}

impl FeatureAddrs {
    /// The feature one of whose (exact) hosts is served at `dest`. Hosts not cached (or stale)
    /// are looked up together, so one slow resolver costs one timeout, not one per host.
    pub(super) async fn feature_at(
        &self,
        policy: &Policy,
        overrides: &HashMap<String, SocketAddr>,
        dest: SocketAddr,
    ) -> Option<String> {
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
                    tokio::net::lookup_host((host.clone(), 443)),
                )
                .await;
                let found: Vec<SocketAddr> = match lookup {
                    Ok(Ok(addrs)) => addrs.collect(),
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
        let canonical = SocketAddr::new(canonical(dest.ip()), dest.port());
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        hosts
            .iter()
            .find(|(_, host)| {
                cache
                    .get(*host)
                    .is_some_and(|(addrs, _)| addrs.contains(&canonical))
            })
            .map(|(feature, _)| feature.to_string())
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
