//! The plan for one request: what the policy says (refuse, forward as it came, or rewrite) and,
//! for a rewrite, the outcome of the rules on the request. Pure: the proxy executes the plan and
//! `explain` prints it, so what `explain` shows is what the proxy does.

use crate::audit::Decision;
use crate::policy::{Feature, Mode, Policy, Rule, UnknownHosts, Verdict};
use crate::response::Refusal;
use crate::rewrite::{self, Edits, Message};

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
        reason: &'static str,
        feature: Option<&'p Feature>,
    },
    /// Consent is granted with rules to apply: see [`rewrite`].
    Rewrite {
        feature: &'p Feature,
        rules: Vec<&'p Rule>,
        withheld: Vec<&'p str>,
    },
}

/// Plan a request to `host` at `path` under `policy` (DESIGN §5, steps 3 and 4).
pub fn plan_request<'p>(policy: &'p Policy, host: &str, path: &str) -> RequestPlan<'p> {
    let report = policy.mode == Mode::Report;
    match policy.decide(host, path) {
        Verdict::Unknown(UnknownHosts::Deny) => RequestPlan::Refuse {
            refusal: Refusal::UnknownHost,
            feature: None,
        },
        Verdict::Unknown(UnknownHosts::Tunnel) => RequestPlan::Forward {
            decision: Decision::Tunneled,
            reason: "destination belongs to no feature",
            feature: None,
        },
        Verdict::Denied { feature } if report => RequestPlan::Forward {
            decision: Decision::WouldBlock,
            reason: "consent denied",
            feature: Some(feature),
        },
        Verdict::Denied { feature } => RequestPlan::Refuse {
            refusal: Refusal::ConsentDenied(feature.on_block),
            feature: Some(feature),
        },
        Verdict::Granted { feature, rules, .. } if rules.is_empty() => RequestPlan::Forward {
            decision: Decision::Allowed,
            reason: "consent granted",
            feature: Some(feature),
        },
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

/// What the rules did to a request.
#[derive(Debug)]
pub struct Rewritten {
    pub decision: Decision,
    pub reason: String,
    pub edits: Edits,
    /// Whether the request leaves as rewritten (`stripped`); otherwise it leaves as it came
    /// (nothing changed, or report mode).
    pub rewritten: bool,
}

/// Apply `rules` to `msg` (a body the rules read is the whole body, already within
/// `max_body_bytes` as received). A request the rules cannot read is refused.
pub fn rewrite(
    mode: Mode,
    rules: &[&Rule],
    withheld: &[&str],
    msg: &mut Message,
    max_body_bytes: u64,
) -> Result<Rewritten, Refusal> {
    let edits = rewrite::apply(rules, msg, max_body_bytes).map_err(Refusal::Unreadable)?;
    let changed = !edits.removed.is_empty() || !edits.replaced.is_empty();
    let (decision, reason) = match (changed, mode) {
        (false, _) => (Decision::Allowed, "consent granted".to_string()),
        (true, Mode::Enforce) => (Decision::Stripped, crate::policy::rules_reason(withheld)),
        (true, Mode::Report) => (Decision::WouldStrip, crate::policy::rules_reason(withheld)),
    };
    Ok(Rewritten {
        decision,
        reason,
        edits,
        rewritten: changed && mode == Mode::Enforce,
    })
}
