//! Tables for every plan: the access check, connections (explicit CONNECT, transparent SNI or no
//! name, report mode, a tunnel's destination after a reload), requests and the rules' outcome.

use std::net::IpAddr;

use http::{HeaderMap, Method};

use super::*;
use crate::config::{self, Config};
use crate::decide::path::normalize;
use crate::decide::policy::OnBlock;
use crate::rewrite::RewriteError;

/// The pack, with two features of our own: one that covers only some paths of its host, one
/// answered with an empty 200 when denied.
const FEATURES: &str = r#"
[[feature]]
name = "paths_only"
hosts = ["shared.example"]
paths = ["/telemetry/"]

[[feature]]
name = "sink"
hosts = ["sink.example"]
on_block = "sink"
"#;

const CONSENT: &str = r#"
[consent]
security_alerts = "granted"
diagnostics = "denied"
push_notifications = "granted"
paths_only = "denied"
sink = "denied"
withhold = ["activity_counts"]
"#;

fn load(settings: &str) -> Config {
    let text = format!("{settings}\n{CONSENT}\n{FEATURES}");
    let dir = std::env::temp_dir();
    config::load_str("plan-test.toml", &text, &dir).expect("the test policy loads")
}

fn enforce() -> Config {
    load("")
}

fn deny_unknown() -> Config {
    load("unknown_hosts = \"deny\"")
}

fn report() -> Config {
    load("mode = \"report\"")
}

/// A plan as a line of the table: what, and for which feature.
fn connect(policy: &Policy, host: Option<&str>) -> String {
    match plan_connect(policy, host) {
        ConnectPlan::Intercept => "intercept".into(),
        ConnectPlan::Tunnel => "tunnel".into(),
        ConnectPlan::Refuse { refusal, feature } => format!(
            "refuse {} {} ({})",
            refusal.status().as_u16(),
            refusal.reason(),
            feature.map_or("-", |f| f.name.as_str())
        ),
    }
}

#[test]
fn clients_are_admitted_by_address_in_either_form() {
    let allowed: Vec<IpNet> = ["127.0.0.0/8", "::1/128"]
        .iter()
        .map(|n| n.parse().expect("net"))
        .collect();
    for (client, admitted) in [
        ("127.0.0.1", true),
        ("127.9.9.9", true),
        ("::1", true),
        // A dual-stack listener reports IPv4 peers as v4-mapped.
        ("::ffff:127.0.0.1", true),
        ("10.0.0.1", false),
        ("::ffff:10.0.0.1", false),
        ("::2", false),
    ] {
        let ip: IpAddr = client.parse().expect("ip");
        assert_eq!(admit(&allowed, ip).is_ok(), admitted, "{client}");
    }
    let refused = admit(&allowed, "10.0.0.1".parse().expect("ip")).expect_err("refused");
    assert_eq!(refused.decision(), Decision::Denied);
    assert_eq!(refused.status(), http::StatusCode::FORBIDDEN);
}

#[test]
fn connections_are_planned_by_name_before_any_tls() {
    let (enforce, deny, report) = (enforce(), deny_unknown(), report());
    let denied = "refuse 403 consent denied (diagnostics)";
    let unknown = "refuse 403 destination belongs to no feature and unknown_hosts = deny (-)";
    for (policy, host, want) in [
        // Explicit CONNECT or transparent SNI: a name.
        (
            &enforce,
            Some("securityupdatecheck.mattermost.com"),
            "intercept",
        ),
        (
            &enforce,
            Some("SecurityUpdateCheck.Mattermost.com."),
            "intercept",
        ),
        (&enforce, Some("pdat.matterlytics.com"), denied),
        // Denied, but only some paths of the host are the feature's: the rest may pass.
        (&enforce, Some("shared.example"), "intercept"),
        // Denied with `on_block = "sink"`: each request gets its empty 200.
        (&enforce, Some("sink.example"), "intercept"),
        (&enforce, Some("example.org"), "tunnel"),
        // Transparent mode without SNI: no name, so no feature by name.
        (&enforce, None, "tunnel"),
        (&deny, Some("example.org"), unknown),
        (&deny, None, unknown),
        // With unknown hosts denied, the paths outside the feature are denied too.
        (
            &deny,
            Some("shared.example"),
            "refuse 403 consent denied (paths_only)",
        ),
        (
            &deny,
            Some("securityupdatecheck.mattermost.com"),
            "intercept",
        ),
        // Report mode refuses nothing at CONNECT: each request is recorded as it would be.
        (&report, Some("pdat.matterlytics.com"), "intercept"),
        (&report, Some("example.org"), "tunnel"),
    ] {
        assert_eq!(connect(&policy.policy, host), want, "{host:?}");
    }
}

#[test]
fn an_open_tunnel_is_planned_again_under_a_new_policy() {
    // The relay asks `plan_connect` of each new policy: a tunnel stays open only while the new
    // policy would still tunnel its destination.
    let before = enforce();
    let late = "[[feature]]\nname = \"late\"\nhosts = [\"late.example\"]\n";
    let text = format!("{CONSENT}late = \"denied\"\n{FEATURES}{late}");
    let after = config::load_str("after.toml", &text, &std::env::temp_dir()).expect("loads");
    for (host, open_after) in [("late.example", false), ("example.org", true)] {
        assert!(matches!(
            plan_connect(&before.policy, Some(host)),
            ConnectPlan::Tunnel
        ));
        let still = matches!(plan_connect(&after.policy, Some(host)), ConnectPlan::Tunnel);
        assert_eq!(still, open_after, "{host}");
    }
    // unknown_hosts turned to deny closes every tunnel.
    assert!(!matches!(
        plan_connect(&deny_unknown().policy, Some("example.org")),
        ConnectPlan::Tunnel
    ));
}

/// A request plan as a line of the table.
fn request(policy: &Policy, host: &str, path: &str) -> String {
    let path = normalize(&Method::POST, path);
    match plan_request(policy, host, path.as_deref().map_err(|e| *e)) {
        RequestPlan::Refuse { refusal, feature } => format!(
            "refuse {} {} ({})",
            refusal.status().as_u16(),
            refusal.reason(),
            feature.map_or("-", |f| f.name.as_str())
        ),
        RequestPlan::Forward {
            decision,
            reason,
            feature,
        } => format!(
            "forward {} {reason} ({})",
            decision.as_str(),
            feature.map_or("-", |f| f.name.as_str())
        ),
        RequestPlan::Rewrite {
            feature,
            rules,
            withheld,
        } => format!(
            "rewrite {} rules {:?} withheld {withheld:?}",
            feature.name,
            rules.iter().map(|r| r.index).collect::<Vec<_>>()
        ),
    }
}

#[test]
fn requests_are_planned_by_host_and_path() {
    let (enforce, deny, report) = (enforce(), deny_unknown(), report());
    let security = "securityupdatecheck.mattermost.com";
    for (policy, host, path, want) in [
        // Granted with a withheld category: the rules of that category apply.
        (
            &enforce,
            security,
            "/security",
            "rewrite security_alerts rules [1] withheld [\"activity_counts\"]",
        ),
        (
            &enforce,
            "pdat.matterlytics.com",
            "/v1/batch",
            "refuse 403 consent denied (diagnostics)",
        ),
        // A feature's paths decide; a path outside them belongs to no feature.
        (
            &enforce,
            "shared.example",
            "/telemetry/x",
            "refuse 403 consent denied (paths_only)",
        ),
        (
            &enforce,
            "shared.example",
            "/other",
            "forward tunneled destination belongs to no feature (-)",
        ),
        (
            &enforce,
            "sink.example",
            "/",
            "refuse 200 consent denied (sink)",
        ),
        (
            &enforce,
            "example.org",
            "/",
            "forward tunneled destination belongs to no feature (-)",
        ),
        (
            &deny,
            "example.org",
            "/",
            "refuse 403 destination belongs to no feature and unknown_hosts = deny (-)",
        ),
        (
            &report,
            "pdat.matterlytics.com",
            "/v1/batch",
            "forward would_block consent denied (diagnostics)",
        ),
        // Paths as Go routes them: decoded, dot-segments gone.
        (
            &enforce,
            "shared.example",
            "/%74elemetry/x",
            "refuse 403 consent denied (paths_only)",
        ),
        (
            &enforce,
            "shared.example",
            "/other/../telemetry//x",
            "refuse 403 consent denied (paths_only)",
        ),
        (
            &enforce,
            security,
            "/x/../security",
            "rewrite security_alerts rules [1] withheld [\"activity_counts\"]",
        ),
        // Ambiguous paths are refused on a feature's host, decided without on any other.
        (
            &enforce,
            "shared.example",
            "/other%2F../telemetry/x",
            "refuse 400 request path has an encoded /, which receivers read differently (paths_only)",
        ),
        (
            &enforce,
            "shared.example",
            "/telemetry;x/y",
            "refuse 400 request path has a ; parameter, which receivers read differently (paths_only)",
        ),
        (
            &enforce,
            "example.org",
            "/a%2Fb",
            "forward tunneled destination belongs to no feature (-)",
        ),
        (
            &enforce,
            "example.org",
            "*",
            "refuse 400 an asterisk-form target is only for OPTIONS (-)",
        ),
    ] {
        assert_eq!(request(&policy.policy, host, path), want, "{host}{path}");
    }
}

#[test]
fn a_feature_granted_with_nothing_withheld_is_checked_only_when_its_pack_knows_something() {
    let text = format!(
        "[consent]\nsecurity_alerts = \"granted\"\ndiagnostics = \"denied\"\npush_notifications = \"denied\"\npaths_only = \"granted\"\nsink = \"denied\"\n{FEATURES}"
    );
    let c = config::load_str("p.toml", &text, &std::env::temp_dir()).expect("loads");
    // The pack knows the security check's parameters: what else it carries is named.
    assert_eq!(
        request(&c.policy, "securityupdatecheck.mattermost.com", "/security"),
        "rewrite security_alerts rules [] withheld []"
    );
    assert_eq!(
        request(&c.policy, "shared.example", "/telemetry/x"),
        "forward allowed consent granted (paths_only)"
    );
}

/// The rules' outcome on a security check with this query, under `config`: the decision, the
/// reason as the record states it, whether the request leaves rewritten, and the query after.
fn rewritten(
    config: &Config,
    query: &str,
) -> Result<(Decision, String, bool, Option<String>), Refusal> {
    let RequestPlan::Rewrite {
        rules,
        mut withheld,
        ..
    } = plan_request(
        &config.policy,
        "securityupdatecheck.mattermost.com",
        Ok("/security"),
    )
    else {
        panic!("the security check is rewritten");
    };
    let mut msg = Message {
        query: Some(query.into()),
        headers: HeaderMap::new(),
        body: bytes::Bytes::new(),
    };
    let limit = config.limits.max_body_bytes;
    let feature = config
        .policy
        .feature_for_host("securityupdatecheck.mattermost.com");
    let known = feature
        .and_then(|f| f.known.as_ref())
        .map(|k| (k, config.policy.consent.unclassified));
    let outcome = super::rewrite(
        config.policy.mode,
        &rules,
        &mut withheld,
        &mut msg,
        limit,
        known,
    )?;
    let reason = outcome.reason.to_string();
    Ok((outcome.decision, reason, outcome.rewritten, msg.query))
}

#[test]
fn the_rules_outcome_names_the_decision_and_its_reason() {
    let (enforce, report) = (enforce(), report());
    let withheld = "withheld: activity_counts";
    for (config, query, decision, reason, leaves_rewritten, query_after) in [
        (
            &enforce,
            "id=x&uc=3&b=10",
            Decision::Stripped,
            withheld,
            true,
            "id=x&b=10",
        ),
        (
            &enforce,
            "id=x&b=10",
            Decision::Allowed,
            "consent granted",
            false,
            "id=x&b=10",
        ),
        // Report mode: the rules run, the record says what they would do, the request leaves
        // as it came (the proxy forwards the original, not `msg`).
        (
            &report,
            "id=x&uc=3",
            Decision::WouldStrip,
            withheld,
            false,
            "id=x",
        ),
    ] {
        let (got, why, leaves, after) = rewritten(config, query).expect("readable");
        assert_eq!(got, decision, "{query}");
        assert_eq!(why, reason, "{query}");
        assert_eq!(leaves, leaves_rewritten, "{query}");
        assert_eq!(after.as_deref(), Some(query_after), "{query}");
    }
    assert_eq!(
        Reason::Withheld(&["activity_counts", "user_names"]).to_string(),
        "withheld: activity_counts, user_names"
    );
    assert_eq!(
        Reason::Withheld(&[]).to_string(),
        "the feature's unconditional rules"
    );
    let unreadable = rewritten(&enforce, "u%zz=1").expect_err("refused");
    assert!(matches!(
        unreadable,
        Refusal::Unreadable(RewriteError::AmbiguousQuery)
    ));
    assert_eq!(unreadable.status(), http::StatusCode::BAD_REQUEST);
    assert_eq!(unreadable.decision(), Decision::Blocked);
    assert!(matches!(
        plan_connect(&enforce.policy, Some("sink.example")),
        ConnectPlan::Intercept
    ));
    assert_eq!(
        Refusal::ConsentDenied(OnBlock::Sink).status(),
        http::StatusCode::OK
    );
}
