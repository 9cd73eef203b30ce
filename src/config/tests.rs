use super::*;
use crate::decide::policy::UnknownHosts;

fn load_text(text: &str) -> Result<Config, ConfigError> {
    load_str("policy.toml", text, Path::new("/etc/consent"))
}

/// The pack's features, in the order it declares them.
const PACK_FEATURES: [&str; 9] = [
    "security_alerts",
    "diagnostics",
    "push_notifications",
    "product_notices",
    "marketplace",
    "licensing",
    "upgrade_checks",
    "upgrades",
    "link_previews",
];

#[test]
fn the_pack_loads_with_the_default_consent() {
    let c = load(None, None).expect("pack loads");
    assert_eq!(c.listen.proxy, "127.0.0.1:3128".parse().expect("addr"));
    let names: Vec<&str> = c.policy.features.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, PACK_FEATURES);
    // Everything but diagnostics: the functions an admin uses are granted and recorded.
    assert_eq!(c.policy.consent.granted.len(), names.len() - 1);
    assert!(!c.policy.consent.granted.contains("diagnostics"));
    assert_eq!(c.policy.consent.withheld.len(), 6);
    assert_eq!(c.ca_cert, PathBuf::from("certs/ca.pem"));
    assert!(c.policy_hash.starts_with("sha256:") && c.policy_hash.len() == 71);
}

#[test]
fn an_overlay_merges_settings_adds_features_and_replaces_consent() {
    let c = load_text(
        r#"
        unknown_hosts = "deny"
        [upstream]
        extra_ca = ["fake-ca.pem"]
        resolve = { "Push.Mattermost.com:443" = "127.0.0.1:9443" }
        [audit]
        path = "logs/audit.jsonl"
        sync = "data"
        [consent]
        diagnostics = "granted"
        acme = "granted"
        withhold = ["configuration"]
        [[feature]]
        name = "acme"
        hosts = ["*.acme.example"]
          [[feature.rule]]
          remove = ["header:x-install-id", "query:uid"]
        "#,
    )
    .expect("valid overlay");
    assert_eq!(c.policy.unknown_hosts, UnknownHosts::Deny);
    assert_eq!(c.upstream.roots, Roots::Webpki);
    assert_eq!(
        c.upstream.extra_ca,
        [PathBuf::from("/etc/consent/fake-ca.pem")]
    );
    assert_eq!(
        c.upstream.resolve["push.mattermost.com:443"],
        "127.0.0.1:9443".parse().expect("addr")
    );
    assert_eq!(
        c.audit,
        AuditTarget::File("/etc/consent/logs/audit.jsonl".into(), None)
    );
    assert_eq!(c.audit_sync, SyncMode::Data);
    assert_eq!(c.policy.features.len(), 10);
    assert_eq!(
        c.policy.consent.granted.iter().collect::<Vec<_>>(),
        ["acme", "diagnostics"]
    );
}

#[test]
fn bad_policies_name_file_key_and_reason() {
    let cases = [
        ("colour = \"red\"", "unknown field `colour`"),
        ("[limits]\nmax_body_bites = 5", "unknown field `max_body_bites`"),
        ("[consent]\nnot_a_feature = \"granted\"", "consent.not_a_feature"),
        ("[consent]\ndiagnostics = \"yes\"", "must be \"granted\" or \"denied\""),
        ("[consent]\nwithhold = [\"nope\"]", "is not a data category"),
        ("[consent]\nunclassified = \"drop\"", "consent.unclassified: must be \"pass\", \"remove\" or \"block\""),
        ("[[feature]]\nname = \"x\"\nhosts = [\"x.example\"]\nknown = [\"cookie:a\"]", "feature[9] (x).known: \"cookie\" is not a selector kind"),
        ("[[feature]]\nname = \"x\"\nhosts = [\"x.example\"]\n[[feature.rule]]\nwhen = { \"json:$.a[*]\" = \"b\" }\nremove = [\"json:$.c\"]", "rule[0].when: json:$.a[*] is not a member"),
        ("[consent]\npush_notifications = \"granted\"\nwithhold = [\"server_identifier\"]", "breaks \"push_notifications\""),
        ("[[feature]]\nname = \"x\"\nhosts = [\"x.example\"]\n[[feature.rule]]\nremove = [\"json:$.a[\"]", "feature[9] (x).rule[0].remove"),
        ("[[feature]]\nname = \"x\"\nhosts = [\"x.example\"]\n[[feature.rule]]\nremove = [\"cookie:a\"]", "not a selector kind"),
        ("[[feature]]\nname = \"x\"\nhosts = [\"x..example\"]", "is not a host name"),
        ("[[feature]]\nname = \"x\"\nhosts = [\"x.example\"]\n[[feature.rule]]\nremove = [\"query:a\"]\nkeep = [\"query:b\"]", "exactly one of"),
        ("[listen]\nproxy = \"localhost\"", "listen.proxy"),
        ("[clients]\nallow = [\"10.0.0.0/33\"]", "clients.allow"),
        ("mode = \"relaxed\"", "unknown variant `relaxed`"),
        ("[audit]\nsync = \"fast\"", "unknown variant `fast`, expected `os` or `data`"),
        ("[[feature]]\nname = \"x\"\nhosts = [\"x.example\"]\n[[feature.rule]]\nreplace = { \"header:x-id\" = \"a\\nb\" }", "feature[9] (x).rule[0].replace: the replacement for header:x-id is not a valid header value"),
        ("[[feature]]\nname = \"x\"\nhosts = [\"x.example\"]\npaths = [\"/v1/../v2/\"]", "feature[9] (x).paths: \"/v1/../v2/\" is not a path prefix as receivers route it"),
        ("[[feature]]\nname = \"x\"\nhosts = [\"x.example\"]\npaths = [\"/%76%31/\"]", "is not a path prefix as receivers route it"),
        ("[[feature]]\nname = \"x\"\nhosts = [\"x.example\"]\n[[feature.rule]]\nremove = [\"json:$.userId\"]\n[[feature.rule]]\nremove = [\"json:$.userid\"]", "\"userId\" and \"userid\" name one member"),
    ];
    for (text, want) in cases {
        let e = load_text(text).expect_err(text).to_string();
        assert!(e.starts_with("policy.toml: "), "{e}");
        assert!(e.contains(want), "{text}: {e}");
    }
}

#[test]
fn withholding_a_required_category_is_fine_when_the_feature_is_denied() {
    let c =
        load_text("[consent]\npush_notifications = \"denied\"\nwithhold = [\"server_identifier\"]")
            .expect("valid");
    assert!(c.policy.consent.withheld.contains("server_identifier"));
}

#[test]
fn consent_derived_from_mattermost_with_explicit_overrides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mm = dir.path().join("config.json");
    std::fs::write(
        &mm,
        r#"{"LogSettings":{"EnableDiagnostics":false},"EmailSettings":{"PushNotificationServer":"https://push.corp.example","PushNotificationContents":"generic"}}"#,
    )
    .expect("write");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[consent]\nfrom_mattermost_config = \"config.json\"\nsecurity_alerts = \"denied\"\nwithhold = [\"activity_counts\"]\n",
    )
    .expect("write");
    let c = load(Some(&policy), None).expect("valid");
    assert_eq!(c.mattermost_config.as_deref(), Some(mm.as_path()));
    assert_eq!(
        c.policy.consent.granted.iter().collect::<Vec<_>>(),
        [
            "licensing",
            "link_previews",
            "marketplace",
            "product_notices",
            "push_notifications",
            "upgrade_checks",
            "upgrades"
        ]
    );
    assert_eq!(
        c.policy.consent.withheld.iter().collect::<Vec<_>>(),
        [
            "activity_counts",
            "message_content",
            "site_identity",
            "user_identifiers"
        ]
    );
    assert!(c.policy.feature_for_host("push.corp.example").is_some());
    let origin = c.consent_origin.join("\n");
    assert!(
        origin.contains("security_alerts = \"denied\"  # policy [consent] security_alerts"),
        "{origin}"
    );
    assert!(
        origin.contains("LogSettings.EnableDiagnostics = false"),
        "{origin}"
    );
    assert!(
        origin.contains("PushNotificationContents = \"generic\""),
        "{origin}"
    );

    // With no policy file at all: the pack, and consent wholly from Mattermost.
    let c = load(None, Some(&mm)).expect("valid");
    assert_eq!(
        c.policy.consent.granted.iter().collect::<Vec<_>>(),
        [
            "licensing",
            "link_previews",
            "marketplace",
            "product_notices",
            "push_notifications",
            "security_alerts",
            "upgrade_checks",
            "upgrades"
        ]
    );
    assert_eq!(
        c.policy.consent.withheld.iter().collect::<Vec<_>>(),
        ["message_content", "site_identity", "user_identifiers"]
    );

    std::fs::write(&mm, "{not json").expect("write");
    let e = load(None, Some(&mm))
        .expect_err("bad config.json")
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("not valid JSON"),
        "{e}"
    );
}

#[test]
fn features_a_consent_table_does_not_name_are_listed() {
    let c = load(None, None).expect("pack loads");
    assert!(c.unkeyed.is_empty(), "{:?}", c.unkeyed);
    let c = load_text("[consent]\nsecurity_alerts = \"granted\"\ndiagnostics = \"denied\"")
        .expect("valid");
    // Every pack feature but the two the table names.
    assert_eq!(c.unkeyed, PACK_FEATURES[2..]);
}

#[test]
fn a_feature_can_replace_a_pack_feature() {
    let c = load_text(
        "[[feature]]\nname = \"push_notifications\"\nhosts = [\"push.internal.example\"]\n[consent]\npush_notifications = \"granted\"",
    )
    .expect("valid");
    assert_eq!(c.policy.features.len(), 9);
    assert!(c.policy.feature_for_host("push.internal.example").is_some());
    assert!(c.policy.feature_for_host("push.mattermost.com").is_none());
}
