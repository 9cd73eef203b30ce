//! The policy in force ([`Active`]), read once per decision and replaced whole on reload: what
//! the shared state holds and the address gate watches.

use std::sync::Arc;

use crate::decide::policy::Policy;

/// The policy in force with its hashes; replaced whole on reload.
pub struct Active {
    pub policy: Policy,
    pub policy_hash: Arc<str>,
    pub consent_hash: Arc<str>,
}

impl Active {
    pub(super) fn new(policy: Policy, policy_hash: &str, consent_hash: &str) -> Arc<Active> {
        Arc::new(Active {
            policy,
            policy_hash: policy_hash.into(),
            consent_hash: consent_hash.into(),
        })
    }
}
