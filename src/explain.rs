//! `consent-proxy explain`: a dry run of one request against a policy, with no network. It calls
//! the proxy's own plans ([`crate::decide::plan`]: [`plan_connect`], then [`plan_request`] and
//! the rules' outcome) and only formats what they return, with the request as it would leave.

use std::fmt::Write as _;

use bytes::Bytes;
use http::{HeaderMap, Uri};

use crate::decide::path::normalize;
use crate::decide::plan::{self, plan_connect, plan_request, ConnectPlan, RequestPlan};
use crate::decide::policy::{normalize_host, Policy, Unclassified};
use crate::decide::{Decision, Reason, Refusal};
use crate::rewrite::selector::Action;
use crate::rewrite::Message;

/// The request to explain.
pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) uri: Uri,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// Explain `req` under `policy`; `max_body_bytes` as the proxy would enforce it.
pub(crate) fn explain(policy: &Policy, req: Request, max_body_bytes: u64) -> String {
    let mut out = String::new();
    let host = normalize_host(req.uri.host().unwrap_or_default());
    let https = req.uri.scheme_str() != Some("http");
    let method = req.method.parse().unwrap_or(http::Method::GET);
    let path = normalize(&method, req.uri.path());
    let refused = |out: &mut String, refusal: Refusal, feature: Option<&str>, when: &str| {
        let _ = writeln!(out, "decision: {}", refusal.decision().as_str());
        let _ = writeln!(out, "feature: {}", feature.unwrap_or("(none)"));
        let _ = writeln!(out, "reason: {}", refusal.reason());
        let _ = writeln!(
            out,
            "response: {} from the proxy{when}",
            refusal.status().as_u16()
        );
    };
    if https {
        match plan_connect(policy, Some(&host)) {
            ConnectPlan::Refuse { refusal, feature } => {
                let when = match refusal {
                    Refusal::ConsentDenied(_) => ", at CONNECT before any TLS",
                    _ => ", at CONNECT",
                };
                refused(&mut out, refusal, feature.map(|f| f.name.as_str()), when);
                return out;
            }
            ConnectPlan::Tunnel => {
                let (decision, reason) = (Decision::Tunneled, Reason::NoFeature);
                let _ = writeln!(
                    out,
                    "decision: {}\nfeature: (none)\nreason: {reason}",
                    decision.as_str()
                );
                let _ = writeln!(
                    out,
                    "the connection is tunnelled without decryption; the request leaves as sent"
                );
                return out;
            }
            ConnectPlan::Intercept => {}
        }
    }
    let (feature, rules, mut withheld) =
        match plan_request(policy, &host, path.as_deref().map_err(|e| *e)) {
            RequestPlan::Refuse { refusal, feature } => {
                refused(&mut out, refusal, feature.map(|f| f.name.as_str()), "");
                return out;
            }
            RequestPlan::Forward {
                decision,
                reason,
                feature,
            } => {
                let _ = writeln!(
                    out,
                    "decision: {}\nfeature: {}\nreason: {reason}",
                    decision.as_str(),
                    feature.map_or("(none)", |f| f.name.as_str())
                );
                write_request(&mut out, &req.method, &req.uri, &req.headers, &req.body);
                return out;
            }
            RequestPlan::Rewrite {
                feature,
                rules,
                withheld,
            } => (feature, rules, withheld),
        };
    let _ = writeln!(out, "feature: {} (consent granted)", feature.name);
    for rule in &rules {
        let verb = match rule.action {
            Action::Remove(_) => "remove",
            Action::Replace(_) => "replace",
            Action::Keep(_) => "keep",
        };
        let why = rule
            .category
            .as_deref()
            .map(|c| format!("category {c} withheld"))
            .unwrap_or_else(|| "always".into());
        let selectors: Vec<String> = rule.action.selectors().map(|s| s.to_string()).collect();
        let _ = writeln!(
            out,
            "rule: {}.rule[{}] ({why}): {verb} {}",
            feature.name,
            rule.index,
            selectors.join(", ")
        );
    }
    let known = feature.known.as_ref();
    if crate::rewrite::reads_body(&rules, &req.headers, known)
        && req.body.len() as u64 > max_body_bytes
    {
        refused(&mut out, Refusal::BodyTooLarge, Some(&feature.name), "");
        return out;
    }
    let mut msg = Message {
        query: req.uri.query().map(str::to_string),
        headers: req.headers.clone(),
        body: req.body.clone(),
    };
    let setting = policy.consent.unclassified;
    let drift = known.map(|k| (k, setting));
    let outcome = match plan::rewrite(
        policy.mode,
        &rules,
        &mut withheld,
        &mut msg,
        max_body_bytes,
        drift,
    ) {
        Ok(o) => o,
        Err(refusal) => {
            if let Refusal::Unclassified(names) = &refusal {
                unclassified(&mut out, names, setting);
            }
            refused(&mut out, refusal, Some(&feature.name), "");
            return out;
        }
    };
    unclassified(&mut out, &outcome.edits.unclassified, setting);
    let _ = writeln!(out, "decision: {}", outcome.decision.as_str());
    let _ = writeln!(out, "reason: {}", outcome.reason);
    let _ = writeln!(out, "removed: {}", outcome.edits.removed.join(", "));
    let _ = writeln!(out, "replaced: {}", outcome.edits.replaced.join(", "));
    if !outcome.rewritten {
        write_request(&mut out, &req.method, &req.uri, &req.headers, &req.body);
    } else {
        let path = path.as_deref().map_or(req.uri.path(), |p| p);
        let path = crate::decide::path::encode(path);
        let pq = match &msg.query {
            Some(q) => format!("{path}?{q}"),
            None => path.into_owned(),
        };
        let uri: Uri = format!(
            "{}://{}{}",
            req.uri.scheme_str().unwrap_or("https"),
            req.uri.authority().map(|a| a.as_str()).unwrap_or(""),
            pq
        )
        .parse()
        .unwrap_or(req.uri.clone());
        write_request(&mut out, &req.method, &uri, &msg.headers, &msg.body);
    }
    out
}

/// What the request carries that the pack does not know, and what each setting does with it.
fn unclassified(out: &mut String, names: &[String], setting: Unclassified) {
    if names.is_empty() {
        return;
    }
    let _ = writeln!(out, "unclassified: {}", names.join(", "));
    for (each, does) in [
        (Unclassified::Pass, "leaves, named in the record"),
        (
            Unclassified::Remove,
            "removed (a batch's whole event), named in removed too",
        ),
        (Unclassified::Block, "the request is refused (403)"),
    ] {
        let mark = if each == setting { "  (in force)" } else { "" };
        let _ = writeln!(out, "  unclassified = {:?}: {does}{mark}", each.as_str());
    }
}

fn write_request(out: &mut String, method: &str, uri: &Uri, headers: &HeaderMap, body: &Bytes) {
    let _ = writeln!(out, "\nthe request as it would leave:\n{method} {uri}");
    for (name, value) in headers {
        let _ = writeln!(out, "{name}: {}", String::from_utf8_lossy(value.as_bytes()));
    }
    if !body.is_empty() {
        let _ = writeln!(out, "\n{}", String::from_utf8_lossy(body));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn run(policy: &str, method: &str, url: &str, body: &str) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = config::load_str("p", policy, dir.path()).expect("valid");
        let mut headers = HeaderMap::new();
        if !body.is_empty() {
            headers.insert("content-length", body.len().into());
        }
        let req = Request {
            method: method.into(),
            uri: url.parse().expect("url"),
            headers,
            body: Bytes::from(body.to_string()),
        };
        explain(&c.policy, req, c.limits.max_body_bytes)
    }

    #[test]
    fn explains_each_kind_of_decision() {
        let out = run(
            "",
            "GET",
            "https://securityupdatecheck.mattermost.com/security?id=a&uc=1&ut=0",
            "",
        );
        assert!(out.contains("decision: stripped"), "{out}");
        assert!(out.contains("rule: security_alerts.rule[1] (category activity_counts withheld): remove query:uc, query:auc, query:tc"), "{out}");
        assert!(
            out.contains("GET https://securityupdatecheck.mattermost.com/security?id=a&ut=0"),
            "{out}"
        );

        let out = run("", "POST", "https://pdat.matterlytics.com/v1/batch", "{}");
        assert!(
            out.contains("decision: blocked")
                && out.contains("403 from the proxy, at CONNECT before any TLS"),
            "{out}"
        );

        let out = run(
            "",
            "POST",
            "https://push.mattermost.com/api/v1/send_push",
            "{\"message\":\"x\",\"channel_name\":\"c\"}",
        );
        assert!(
            out.contains("replaced: json:$['message']")
                && out.contains("removed: json:$['channel_name']"),
            "{out}"
        );
        assert!(out.contains("content-length: 44"), "{out}");

        let out = run(
            "",
            "POST",
            "https://push.mattermost.com/api/v1/send_push",
            "not json",
        );
        assert!(
            out.contains("decision: blocked") && out.contains("415"),
            "{out}"
        );

        let out = run("", "GET", "https://example.org/", "");
        assert!(out.contains("decision: tunneled"), "{out}");

        let out = run(
            "mode = \"report\"",
            "POST",
            "https://pdat.matterlytics.com/v1/batch",
            "{}",
        );
        assert!(out.contains("decision: would_block"), "{out}");
    }

    #[test]
    fn explains_what_the_pack_does_not_know_and_each_setting() {
        let url = "https://securityupdatecheck.mattermost.com/security?id=a&ut=0&nx=1";
        let out = run("", "GET", url, "");
        assert!(out.contains("unclassified: query:nx"), "{out}");
        assert!(
            out.contains("unclassified = \"pass\": leaves, named in the record  (in force)"),
            "{out}"
        );
        assert!(out.contains("nx=1"), "{out}");
        let out = run(
            "[consent]\nsecurity_alerts = \"granted\"\nunclassified = \"block\"",
            "GET",
            url,
            "",
        );
        assert!(
            out.contains("unclassified = \"block\": the request is refused (403)  (in force)"),
            "{out}"
        );
        assert!(out.contains("decision: blocked"), "{out}");
        let out = run(
            "[consent]\nsecurity_alerts = \"granted\"\nunclassified = \"remove\"",
            "GET",
            url,
            "",
        );
        assert!(out.contains("removed: query:nx"), "{out}");
        assert!(out.contains("security?id=a&ut=0\n"), "{out}");
    }
}
