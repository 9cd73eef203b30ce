//! Live reload: the policy file and Mattermost's config.json are watched (polled every 500 ms,
//! by content) and reloaded on change and on SIGHUP. A new policy that fails to load leaves the
//! last good one in force. What changed is described for the `policy_loaded` audit record.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::shared::{Active, Shared, Sources};
use crate::audit::Entry;
use crate::decide::policy::Policy;
use crate::decide::Decision;
use crate::metrics::OutcomeLabels;

const POLL: Duration = Duration::from_millis(500);

/// Watch the sources until shutdown; reload on change or SIGHUP. The files are read now, when
/// the watcher is made, so a change right after start is not taken for the starting state.
pub(super) fn watch(shared: Arc<Shared>) -> impl std::future::Future<Output = ()> {
    let sources = shared.sources.clone();
    let seen = (
        read(sources.policy_file.as_deref()),
        read(sources.mattermost.as_deref()),
    );
    let hangup = hangup_signal();
    watch_from(shared, sources, seen, hangup)
}

type Seen = (Option<Vec<u8>>, Option<Vec<u8>>);

async fn watch_from(
    shared: Arc<Shared>,
    sources: Sources,
    mut seen: Seen,
    mut hangup: Option<tokio::signal::unix::Signal>,
) {
    let mut mattermost = sources.mattermost.clone();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let trigger = tokio::select! {
            () = shared.token.cancelled() => return,
            _ = tick.tick() => None,
            Some(()) = recv(&mut hangup) => Some("SIGHUP"),
        };
        let now = (
            read(sources.policy_file.as_deref()),
            read(mattermost.as_deref()),
        );
        let trigger = match trigger {
            Some(t) => t,
            None if now.0 != seen.0 => "policy file changed",
            None if now.1 != seen.1 => "Mattermost config changed",
            None => continue,
        };
        if let Some(path) = shared.reload(trigger).await {
            mattermost = Some(path);
        }
        seen = (
            read(sources.policy_file.as_deref()),
            read(mattermost.as_deref()),
        );
    }
}

impl Shared {
    /// Load the policy again; on success put it in force and audit what changed, on failure
    /// keep the last good one and audit that. Returns the new config's Mattermost path.
    async fn reload(&self, trigger: &str) -> Option<std::path::PathBuf> {
        let loaded = crate::config::load(
            self.sources.policy_file.as_deref(),
            self.sources.mattermost_override.as_deref(),
        );
        let config = match loaded {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "reload failed; the last good policy stays in force");
                let reason =
                    format!("reload ({trigger}) failed, the last good policy stays in force: {e}");
                let _ = self.record(&Entry::new(Decision::Error, reason)).await;
                self.metrics
                    .reloads
                    .get_or_create(&OutcomeLabels {
                        outcome: "failed".into(),
                    })
                    .inc();
                return None;
            }
        };
        let mattermost = config.mattermost_config.clone();
        let old = self.current();
        if *old.policy_hash == *config.policy_hash && *old.consent_hash == *config.consent_hash {
            return mattermost;
        }
        let change = describe_change(&old.policy, &config.policy);
        let new = Active::new(config.policy, &config.policy_hash, &config.consent_hash);
        let reason = format!("reloaded ({trigger}): {change}");
        self.metrics
            .reloads
            .get_or_create(&OutcomeLabels {
                outcome: "ok".into(),
            })
            .inc();
        info!(%reason, "policy reloaded");
        let loaded = self
            .audit
            .policy_loaded(
                reason,
                new.policy_hash.to_string(),
                new.consent_hash.to_string(),
            )
            .await;
        match loaded {
            Ok(()) => self.metrics.audit_records.inc(),
            Err(_) => self.metrics.audit_failures.inc(),
        };
        self.active.send_replace(new);
        mattermost
    }
}

/// The whole file, or `None` when it cannot be read (small files: compared by content, which
/// mtime granularity cannot fool).
fn read(path: Option<&Path>) -> Option<Vec<u8>> {
    std::fs::read(path?).ok()
}

fn hangup_signal() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// What differs between two policies, for the audit record: features granted or denied,
/// categories withheld or released, features added or removed, rules changed.
pub fn describe_change(old: &Policy, new: &Policy) -> String {
    let mut parts = Vec::new();
    let names = |p: &Policy| {
        p.features
            .iter()
            .map(|f| f.name.clone())
            .collect::<BTreeSet<_>>()
    };
    let (before, after) = (names(old), names(new));
    for name in before.union(&after) {
        let state = |p: &Policy| match (
            p.features.iter().any(|f| &f.name == name),
            p.consent.granted.contains(name),
        ) {
            (false, _) => "absent",
            (true, true) => "granted",
            (true, false) => "denied",
        };
        let (was, is) = (state(old), state(new));
        if was != is {
            parts.push(format!("{name} {was} -> {is}"));
        }
    }
    for c in new.consent.withheld.difference(&old.consent.withheld) {
        parts.push(format!("withhold +{c}"));
    }
    for c in old.consent.withheld.difference(&new.consent.withheld) {
        parts.push(format!("withhold -{c}"));
    }
    if parts.is_empty() {
        parts.push("rules, hosts or settings changed".into());
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    #[test]
    fn changes_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = config::load_str("a", "", dir.path()).expect("valid").policy;
        let new = config::load_str(
            "b",
            "[consent]\nsecurity_alerts = \"granted\"\ndiagnostics = \"granted\"\nwithhold = [\"activity_counts\", \"configuration\"]",
            dir.path(),
        )
        .expect("valid")
        .policy;
        assert_eq!(
            describe_change(&old, &new),
            "diagnostics denied -> granted; push_notifications granted -> denied; withhold +configuration; \
             withhold -channel_names; withhold -message_content; withhold -user_names"
        );
        assert_eq!(
            describe_change(&old, &old),
            "rules, hosts or settings changed"
        );
    }
}
