//! One request's rewrite, alone, N times: the benchmark's feature (`bench/feature.toml`) planned
//! and applied to the benchmark's bodies exactly as the exchange does it (drift check, rules,
//! record names), without sockets, TLS or the audit log. For instruction counts that do not
//! depend on a noisy machine: `bench/rewrite-cost.sh` runs it under callgrind twice and prints
//! the instructions one rewrite costs.
//!
//! `rewrite_cost small|large N`

use std::path::Path;

use consent_proxy::decide::plan::{self, plan_request, RequestPlan};
use consent_proxy::rewrite::Message;
use http::{HeaderMap, HeaderValue};

#[path = "shared/payload.rs"]
mod payload;

type Error = Box<dyn std::error::Error + Send + Sync>;

const FEATURE: &str = include_str!("../bench/feature.toml");

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (body, n) = match args.as_slice() {
        [size, n] => {
            let body = match size.as_str() {
                "small" => payload::small(),
                "large" => payload::large(),
                other => return Err(format!("small or large, not {other:?}").into()),
            };
            (body, n.parse::<usize>()?)
        }
        _ => return Err("usage: rewrite_cost small|large N".into()),
    };
    let config = consent_proxy::load_str("bench", FEATURE, Path::new("."))?;
    let policy = &config.policy;
    let RequestPlan::Rewrite {
        feature,
        rules,
        withheld,
    } = plan_request(policy, "bench.test", Ok("/v1/events"))
    else {
        return Err("the bench feature does not rewrite /v1/events".into());
    };
    let known = feature
        .known
        .as_ref()
        .map(|k| (k, policy.consent.unclassified));
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert("x-install-id", HeaderValue::from_static("install-1"));
    let mut removed = 0;
    for _ in 0..n {
        let mut msg = Message {
            query: None,
            headers: headers.clone(),
            body: body.clone(),
        };
        let mut withheld = withheld.clone();
        let max = config.limits.max_body_bytes;
        let done = plan::rewrite(policy.mode, &rules, &mut withheld, &mut msg, max, known)
            .map_err(|refusal| refusal.reason())?;
        removed += done.edits.removed.len();
    }
    println!(
        "{n} rewrites of {} bytes, {removed} names recorded",
        body.len()
    );
    Ok(())
}
