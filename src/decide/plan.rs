//! The plans, one function a phase (STYLE "One decision path"): [`admit`] a client,
//! [`plan_connect`] a connection before any request is read, [`plan_request`] a request by its
//! destination, then [`rewrite()`] it with the rules that apply. Every listener, the relay after a
//! reload and `explain` call these and nothing else to decide, so a decision is made in one
//! place whichever way the traffic came.

use std::net::IpAddr;

use ipnet::IpNet;

use super::outcome::{Decision, Reason, Refusal};
use super::path::PathError;
use super::policy::{
    canonical, ConnectVerdict, Feature, Mode, Policy, Rule, Unclassified, UnknownHosts, Verdict,
};
use crate::rewrite::{self, Drift, Edits, Known, Message};

/// The access check (`[clients] allow`), before anything else a client sends is read.
pub fn admit(allowed: &[IpNet], client: IpAddr) -> Result<(), Refusal> {
    let ip = canonical(client);
    if allowed.iter().any(|net| net.contains(&ip)) {
        Ok(())
    } else {
        Err(Refusal::ClientNotAllowed)
    }
}

/// What to do with a connection before any request on it is read.
#[derive(Debug)]
pub enum ConnectPlan<'p> {
    /// Answer (or close) now, before any TLS: nothing the client could send would be allowed.
    Refuse {
        refusal: Refusal,
        feature: Option<&'p Feature>,
    },
    /// The destination belongs to no feature: pass the bytes through unread.
    Tunnel,
    /// The destination is a feature host: terminate TLS and plan each request.
    Intercept,
}

/// Plan a connection to `host`: a CONNECT, a TLS ClientHello's SNI, a tunnel still open when a
/// new policy comes into force, or `explain`'s `https` URL. `None`: the connection names no host
/// (transparent mode without SNI), so it can only be a destination of no feature.
pub fn plan_connect<'p>(policy: &'p Policy, host: Option<&str>) -> ConnectPlan<'p> {
    let verdict = match host {
        Some(host) => policy.connect(host),
        None => ConnectVerdict::Unknown(policy.unknown_hosts),
    };
    match verdict {
        ConnectVerdict::Intercept => ConnectPlan::Intercept,
        ConnectVerdict::Block { feature } => ConnectPlan::Refuse {
            refusal: Refusal::ConsentDenied(feature.on_block),
            feature: Some(feature),
        },
        ConnectVerdict::Unknown(UnknownHosts::Deny) => ConnectPlan::Refuse {
            refusal: Refusal::UnknownHost,
            feature: None,
        },
        ConnectVerdict::Unknown(UnknownHosts::Tunnel) => ConnectPlan::Tunnel,
    }
}

/// What to do with one request, decided from its destination before its body is read.
#[derive(Debug)]
pub enum RequestPlan<'p> {
    /// Answer the request here, with this refusal.
    Refuse {
        refusal: Refusal,
        feature: Option<&'p Feature>,
    },
    /// Forward it as it came, and record this decision.
    Forward {
        decision: Decision,
        reason: Reason<'static>,
        feature: Option<&'p Feature>,
    },
    /// Consent is granted with rules to apply: see [`rewrite()`].
    Rewrite {
        feature: &'p Feature,
        rules: Vec<&'p Rule>,
        withheld: Vec<&'p str>,
    },
}

/// Plan a request to `host` at `path`, the path as [`super::path::normalize`] read it (DESIGN
/// §5, steps 3 and 4). A path that reads ambiguously is refused where it would be decided on (a
/// host some feature covers); a destination of no feature is decided without it.
pub fn plan_request<'p>(
    policy: &'p Policy,
    host: &str,
    path: Result<&str, PathError>,
) -> RequestPlan<'p> {
    let path = match path {
        Ok(path) => path,
        Err(PathError::Asterisk(why)) => {
            return RequestPlan::Refuse {
                refusal: Refusal::Malformed(why),
                feature: policy.feature_for_host(host),
            }
        }
        Err(PathError::Ambiguous(why)) => match policy.feature_for_host(host) {
            Some(feature) => {
                return RequestPlan::Refuse {
                    refusal: Refusal::Malformed(why),
                    feature: Some(feature),
                }
            }
            None => return no_feature(policy.unknown_hosts),
        },
    };
    let report = policy.mode == Mode::Report;
    match policy.decide(host, path) {
        Verdict::Unknown(unknown) => no_feature(unknown),
        Verdict::Denied { feature } if report => RequestPlan::Forward {
            decision: Decision::WouldBlock,
            reason: Reason::ConsentDenied,
            feature: Some(feature),
        },
        Verdict::Denied { feature } => RequestPlan::Refuse {
            refusal: Refusal::ConsentDenied(feature.on_block),
            feature: Some(feature),
        },
        Verdict::UnknownPath { feature } if report => RequestPlan::Forward {
            decision: Decision::WouldBlock,
            reason: Reason::UnknownPath,
            feature: Some(feature),
        },
        Verdict::UnknownPath { feature } => RequestPlan::Refuse {
            refusal: Refusal::UnknownPath,
            feature: Some(feature),
        },
        // Nothing to apply and nothing the pack knows to check it against: it leaves as it came.
        Verdict::Granted { feature, rules, .. } if rules.is_empty() && feature.known.is_none() => {
            RequestPlan::Forward {
                decision: Decision::Allowed,
                reason: Reason::ConsentGranted,
                feature: Some(feature),
            }
        }
        Verdict::Granted {
            feature,
            rules,
            withheld,
        } => RequestPlan::Rewrite {
            feature,
            rules,
            withheld,
        },
    }
}

/// A request to a destination of no feature.
fn no_feature<'p>(unknown: UnknownHosts) -> RequestPlan<'p> {
    match unknown {
        UnknownHosts::Deny => RequestPlan::Refuse {
            refusal: Refusal::UnknownHost,
            feature: None,
        },
        UnknownHosts::Tunnel => RequestPlan::Forward {
            decision: Decision::Tunneled,
            reason: Reason::NoFeature,
            feature: None,
        },
    }
}

/// What the rules did to a request.
#[derive(Debug)]
pub struct Rewritten<'w> {
    pub decision: Decision,
    pub reason: Reason<'w>,
    pub edits: Edits,
    /// Whether the request leaves as rewritten (`stripped`); otherwise it leaves as it came
    /// (nothing changed, or report mode).
    pub rewritten: bool,
}

/// Apply `rules` to `msg` (a body the rules read is the whole body, already within
/// `max_body_bytes` as received), after checking it against what the pack `known`s with the
/// admin's `unclassified` setting. A request the rules cannot read, or that carries what the
/// pack does not know under `block`, is refused. `withheld` is left holding the categories
/// whose rules changed the request (and `unclassified` when that was removed): the reason.
pub fn rewrite<'w>(
    mode: Mode,
    rules: &[&Rule],
    withheld: &'w mut Vec<&str>,
    msg: &mut Message,
    max_body_bytes: u64,
    known: Option<(&Known, Unclassified)>,
) -> Result<Rewritten<'w>, Refusal> {
    let edits = match known {
        Some((known, setting)) => {
            let remove = setting == Unclassified::Remove;
            let drift = Drift { known, remove };
            rewrite::apply_with_drift(rules, msg, max_body_bytes, drift)
        }
        None => rewrite::apply(rules, msg, max_body_bytes),
    }
    .map_err(Refusal::Unreadable)?;
    withheld.retain(|c| {
        edits
            .by
            .iter()
            .any(|i| rules.get(*i).and_then(|r| r.category.as_deref()) == Some(*c))
    });
    let setting = known.map(|(_, s)| s);
    if !edits.unclassified.is_empty() {
        match (setting, mode) {
            (Some(Unclassified::Block), Mode::Enforce) => {
                return Err(Refusal::Unclassified(edits.unclassified))
            }
            (Some(Unclassified::Block), Mode::Report) => {
                return Ok(Rewritten {
                    decision: Decision::WouldBlock,
                    reason: Reason::Unclassified,
                    edits,
                    rewritten: false,
                })
            }
            (Some(Unclassified::Remove), _) => withheld.push("unclassified"),
            _ => {}
        }
    }
    let withheld: &'w [&str] = withheld;
    let changed = !edits.removed.is_empty() || !edits.replaced.is_empty();
    let (decision, reason) = match (changed, mode) {
        (false, _) => (Decision::Allowed, Reason::ConsentGranted),
        (true, Mode::Enforce) => (Decision::Stripped, Reason::Withheld(withheld)),
        (true, Mode::Report) => (Decision::WouldStrip, Reason::Withheld(withheld)),
    };
    Ok(Rewritten {
        decision,
        reason,
        edits,
        rewritten: changed && mode == Mode::Enforce,
    })
}

#[cfg(test)]
mod tests;
