//! Consent read from Mattermost's own `config.json` (DESIGN §3): the switches the admin flips in
//! the System Console become the proxy's consent. Pure: JSON text in, consent out. Keys missing
//! from the file take Mattermost's own defaults.

use serde_json::Value;

/// The consent one `config.json` implies, each value with the setting it came from.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Derived {
    /// `(feature, granted, why)`.
    pub features: Vec<(&'static str, bool, String)>,
    /// `(category, why)`.
    pub withheld: Vec<(&'static str, String)>,
    /// The host of `EmailSettings.PushNotificationServer`, which joins `push_notifications`.
    pub push_host: Option<String>,
}

#[derive(Debug, Eq, PartialEq, thiserror::Error)]
pub enum MattermostError {
    #[error("not valid JSON")]
    NotJson,
    #[error("{0} is not a boolean")]
    NotBool(&'static str),
    #[error("{0} is not a string")]
    NotString(&'static str),
    #[error("EmailSettings.PushNotificationServer is not an https:// or http:// URL with a host")]
    BadPushServer,
}

/// Derive consent from the text of a Mattermost `config.json`.
pub fn derive(text: &str) -> Result<Derived, MattermostError> {
    let doc: Value = serde_json::from_str(text).map_err(|_| MattermostError::NotJson)?;
    let flag = |section: &str,
                key: &'static str,
                default: bool|
     -> Result<(bool, String), MattermostError> {
        match doc
            .get(section)
            .and_then(|s| s.get(key.rsplit('.').next().unwrap_or(key)))
        {
            None | Some(Value::Null) => Ok((
                default,
                format!("{key} (missing; Mattermost's default {default})"),
            )),
            Some(Value::Bool(b)) => Ok((*b, format!("{key} = {b}"))),
            Some(_) => Err(MattermostError::NotBool(key)),
        }
    };
    let text_of = |section: &str, key: &'static str| -> Result<Option<String>, MattermostError> {
        match doc
            .get(section)
            .and_then(|s| s.get(key.rsplit('.').next().unwrap_or(key)))
        {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(MattermostError::NotString(key)),
        }
    };

    let security = flag(
        "ServiceSettings",
        "ServiceSettings.EnableSecurityFixAlert",
        true,
    )?;
    let diagnostics = flag("LogSettings", "LogSettings.EnableDiagnostics", true)?;
    // EnableSentry defaults to EnableDiagnostics. One feature covers both channels, so it is
    // granted only when both are on: a switched-off channel must stay off on the wire.
    let sentry = flag("LogSettings", "LogSettings.EnableSentry", diagnostics.0)?;
    let push = flag("EmailSettings", "EmailSettings.SendPushNotifications", true)?;
    let server = text_of("EmailSettings", "EmailSettings.PushNotificationServer")?;
    let contents = text_of("EmailSettings", "EmailSettings.PushNotificationContents")?;

    let notices = (
        flag(
            "AnnouncementSettings",
            "AnnouncementSettings.AdminNoticesEnabled",
            true,
        )?,
        flag(
            "AnnouncementSettings",
            "AnnouncementSettings.UserNoticesEnabled",
            true,
        )?,
    );
    let marketplace = (
        flag("PluginSettings", "PluginSettings.EnableMarketplace", true)?,
        flag(
            "PluginSettings",
            "PluginSettings.EnableRemoteMarketplace",
            true,
        )?,
    );
    let previews = flag(
        "ServiceSettings",
        "ServiceSettings.EnableLinkPreviews",
        true,
    )?;
    let no_switch = |what: &str| format!("no setting: {what} when an admin asks for it");

    let push_host = match server.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(url) => Some(url_host(url).ok_or(MattermostError::BadPushServer)?),
    };
    let features = vec![
        ("security_alerts", security.0, security.1),
        (
            "diagnostics",
            diagnostics.0 && sentry.0,
            format!("{}; {}", diagnostics.1, sentry.1),
        ),
        ("push_notifications", push.0, push.1),
        // Either kind of notice makes the server fetch them.
        (
            "product_notices",
            notices.0 .0 || notices.1 .0,
            format!("{}; {}", notices.0 .1, notices.1 .1),
        ),
        (
            "marketplace",
            marketplace.0 .0 && marketplace.1 .0,
            format!("{}; {}", marketplace.0 .1, marketplace.1 .1),
        ),
        ("licensing", true, no_switch("a trial licence is requested")),
        (
            "upgrade_checks",
            true,
            no_switch("the latest version is looked up"),
        ),
        (
            "upgrades",
            true,
            no_switch("the Enterprise build is downloaded"),
        ),
        ("link_previews", previews.0, previews.1),
    ];
    let level = contents.clone().unwrap_or_else(|| "full".into());
    let why = match &contents {
        Some(c) => format!("EmailSettings.PushNotificationContents = {c:?}"),
        None => {
            "EmailSettings.PushNotificationContents (missing; Mattermost's default \"full\")".into()
        }
    };
    let categories: &[&'static str] = match level.as_str() {
        "full" => &[],
        "generic" => &["message_content"],
        "generic_no_channel" => &["message_content", "channel_names"],
        "id_loaded" => &["message_content", "channel_names", "user_names"],
        // A level this version does not know: withhold all it could mean (fail closed).
        _ => &["message_content", "channel_names", "user_names"],
    };
    let mut withheld: Vec<(&'static str, String)> =
        categories.iter().map(|c| (*c, why.clone())).collect();
    // No setting covers these: they stay withheld (DESIGN §3).
    for category in ["user_identifiers", "site_identity"] {
        withheld.push((category, "no Mattermost setting covers it: withheld".into()));
    }
    Ok(Derived {
        features,
        withheld,
        push_host,
    })
}

/// The lowercase host of an `http(s)://host[:port][/path]` URL.
fn url_host(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    match uri.scheme_str() {
        Some("https") | Some("http") => {}
        _ => return None,
    }
    let host = uri.host()?.trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TELEMETRY: [&str; 3] = ["security_alerts", "diagnostics", "push_notifications"];

    /// The granted features of the privacy policy's three.
    fn granted(d: &Derived) -> Vec<&str> {
        d.features
            .iter()
            .filter(|(f, g, _)| *g && TELEMETRY.contains(f))
            .map(|(f, _, _)| *f)
            .collect()
    }

    /// The withheld categories a setting decides (the two no setting covers are always there).
    fn withheld(d: &Derived) -> Vec<&str> {
        let all: Vec<&str> = d.withheld.iter().map(|(c, _)| *c).collect();
        assert!(
            all.ends_with(&["user_identifiers", "site_identity"]),
            "{all:?}"
        );
        all[..all.len() - 2].to_vec()
    }

    #[test]
    fn functions_follow_their_switches_and_those_without_one_are_granted() {
        let functions = |text: &str| -> Vec<&'static str> {
            derive(text)
                .expect(text)
                .features
                .into_iter()
                .filter(|(f, g, _)| *g && !TELEMETRY.contains(f))
                .map(|(f, _, _)| f)
                .collect()
        };
        let all = [
            "product_notices",
            "marketplace",
            "licensing",
            "upgrade_checks",
            "upgrades",
            "link_previews",
        ];
        assert_eq!(functions("{}"), all);
        assert_eq!(
            functions(r#"{"AnnouncementSettings":{"AdminNoticesEnabled":false}}"#),
            all,
            "user notices are still fetched"
        );
        assert_eq!(
            functions(
                r#"{"AnnouncementSettings":{"AdminNoticesEnabled":false,"UserNoticesEnabled":false},
                    "PluginSettings":{"EnableRemoteMarketplace":false},
                    "ServiceSettings":{"EnableLinkPreviews":false}}"#
            ),
            ["licensing", "upgrade_checks", "upgrades"]
        );
    }

    #[test]
    fn the_fixture_grants_everything_and_names_the_push_host() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/fixtures/mattermost/config.json"
        ))
        .expect("fixture");
        let d = derive(&text).expect("derives");
        assert_eq!(
            granted(&d),
            ["security_alerts", "diagnostics", "push_notifications"]
        );
        assert!(withheld(&d).is_empty());
        assert_eq!(d.push_host.as_deref(), Some("push.mattermost.com"));
    }

    #[test]
    fn switches_and_contents_levels() {
        let cases = [
            (
                "{}",
                vec!["security_alerts", "diagnostics", "push_notifications"],
                vec![],
            ),
            (
                r#"{"LogSettings":{"EnableDiagnostics":false}}"#,
                vec!["security_alerts", "push_notifications"],
                vec![],
            ),
            (
                r#"{"LogSettings":{"EnableSentry":false}}"#,
                vec!["security_alerts", "push_notifications"],
                vec![],
            ),
            (
                r#"{"ServiceSettings":{"EnableSecurityFixAlert":false},"EmailSettings":{"SendPushNotifications":false}}"#,
                vec!["diagnostics"],
                vec![],
            ),
            (
                r#"{"EmailSettings":{"PushNotificationContents":"generic"}}"#,
                vec!["security_alerts", "diagnostics", "push_notifications"],
                vec!["message_content"],
            ),
            (
                r#"{"EmailSettings":{"PushNotificationContents":"generic_no_channel"}}"#,
                vec!["security_alerts", "diagnostics", "push_notifications"],
                vec!["message_content", "channel_names"],
            ),
            (
                r#"{"EmailSettings":{"PushNotificationContents":"id_loaded"}}"#,
                vec!["security_alerts", "diagnostics", "push_notifications"],
                vec!["message_content", "channel_names", "user_names"],
            ),
            (
                r#"{"EmailSettings":{"PushNotificationContents":"surprise"}}"#,
                vec!["security_alerts", "diagnostics", "push_notifications"],
                vec!["message_content", "channel_names", "user_names"],
            ),
        ];
        for (text, want_granted, want_withheld) in cases {
            let d = derive(text).expect(text);
            assert_eq!(granted(&d), want_granted, "{text}");
            assert_eq!(withheld(&d), want_withheld, "{text}");
        }
    }

    #[test]
    fn push_server_host() {
        for (url, want) in [
            ("https://Push.Example.org/", Some("push.example.org")),
            ("https://push.internal:8066", Some("push.internal")),
            ("", None),
        ] {
            let text = format!(r#"{{"EmailSettings":{{"PushNotificationServer":"{url}"}}}}"#);
            assert_eq!(
                derive(&text).expect("derives").push_host.as_deref(),
                want,
                "{url}"
            );
        }
        let bad = r#"{"EmailSettings":{"PushNotificationServer":"ftp://x"}}"#;
        assert_eq!(derive(bad), Err(MattermostError::BadPushServer));
    }

    #[test]
    fn bad_files_are_errors() {
        assert_eq!(derive("{"), Err(MattermostError::NotJson));
        assert_eq!(
            derive(r#"{"LogSettings":{"EnableDiagnostics":"yes"}}"#),
            Err(MattermostError::NotBool("LogSettings.EnableDiagnostics"))
        );
    }
}
