//! Live reload: the policy file and Mattermost's config.json are watched (polled every 500 ms,
//! by content) and reloaded on change and on SIGHUP. A new policy that fails to load leaves the
//! last good one in force. What changed is described for the `policy_loaded` audit record.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::active::Active;
use super::shared::{Shared, Sources};
use crate::audit::Entry;
use crate::config::Loaded;
use crate::decide::policy::Policy;
use crate::decide::Decision;
use crate::metrics::OutcomeLabels;

const POLL: Duration = Duration::from_millis(500);

/// Watch the sources until shutdown; reload on change or SIGHUP. A file is compared with the
/// bytes the policy in force was built from (`loaded`), so a change made while a reload was
/// being built is seen at the next poll and triggers another.
pub(super) fn watch(shared: Arc<Shared>, loaded: Loaded) -> impl std::future::Future<Output = ()> {
    let sources = shared.sources.clone();
    let hangup = hangup_signal();
    watch_from(shared, sources, loaded, hangup)
}

async fn watch_from(
    shared: Arc<Shared>,
    sources: Sources,
    mut seen: Loaded,
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
        let now = Loaded {
            policy_file: read(sources.policy_file.as_deref()),
            mattermost: read(mattermost.as_deref()),
        };
        let trigger = match trigger {
            Some(t) => t,
            None if now.policy_file != seen.policy_file => "policy file changed",
            None if now.mattermost != seen.mattermost => "Mattermost config changed",
            None => continue,
        };
        // What this load read is what is in force now; when it fails, what was read before it
        // (a file changed since differs from that, and is tried again).
        seen = match shared.reload(trigger).await {
            Some((path, loaded)) => {
                mattermost = path;
                loaded
            }
            None => now,
        };
    }
}

impl Shared {
    /// Load the policy again; on success put it in force and audit what changed, on failure
    /// keep the last good one and audit that. Returns the new config's Mattermost path and the
    /// bytes it was built from.
    async fn reload(&self, trigger: &str) -> Option<(Option<PathBuf>, Loaded)> {
        // A large policy takes a while to build: not on a worker that serves requests.
        let (file, mattermost) = (
            self.sources.policy_file.clone(),
            self.sources.mattermost_override.clone(),
        );
        let built = tokio::task::spawn_blocking(move || {
            crate::config::load(file.as_deref(), mattermost.as_deref())
        })
        .await;
        let loaded = match built {
            Ok(loaded) => loaded,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: the runtime is shutting down, and nothing is put in force.
            Err(_) => return None,
        };
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
        let read = Some((config.mattermost_config.clone(), config.loaded.clone()));
        let old = self.current();
        if *old.policy_hash == *config.policy_hash && *old.consent_hash == *config.consent_hash {
            return read;
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
        // A record that cannot be written is counted by the writer; the policy takes effect all
        // the same (every decision under it is refused until the log is written again).
        let _ = self
            .audit
            .policy_loaded(
                reason,
                new.policy_hash.to_string(),
                new.consent_hash.to_string(),
            )
            .await;
        self.active.send_replace(new);
        read
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
/// The consent in force, for the record that starts a log: `granted a, b; denied c; withheld x,
/// y; unclassified pass`.
pub fn describe_consent(policy: &Policy) -> String {
    let (granted, denied): (Vec<&str>, Vec<&str>) = policy
        .features
        .iter()
        .map(|f| f.name.as_str())
        .partition(|name| policy.consent.granted.contains(*name));
    let withheld: Vec<&str> = policy.consent.withheld.iter().map(String::as_str).collect();
    let list = |names: &[&str]| {
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    };
    format!(
        "granted {}; denied {}; withheld {}; unclassified {}",
        list(&granted),
        list(&denied),
        list(&withheld),
        policy.consent.unclassified.as_str()
    )
}

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
    let (was, is) = (old.consent.unclassified, new.consent.unclassified);
    if was != is {
        parts.push(format!("unclassified {} -> {}", was.as_str(), is.as_str()));
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
            "[consent]\nsecurity_alerts = \"granted\"\ndiagnostics = \"granted\"\nproduct_notices = \"granted\"\n\
             marketplace = \"granted\"\nlicensing = \"granted\"\nupgrade_checks = \"granted\"\n\
             upgrades = \"granted\"\nlink_previews = \"granted\"\n\
             withhold = [\"activity_counts\", \"configuration\", \"user_identifiers\", \"site_identity\"]\n\
             unclassified = \"block\"",
            dir.path(),
        )
        .expect("valid")
        .policy;
        assert_eq!(
            describe_change(&old, &new),
            "diagnostics denied -> granted; push_notifications granted -> denied; withhold +configuration; \
             withhold -channel_names; withhold -message_content; withhold -user_names; \
             unclassified pass -> block"
        );
        assert_eq!(
            describe_change(&old, &old),
            "rules, hosts or settings changed"
        );
    }
}
