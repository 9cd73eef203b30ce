//! The policy parser: any text as an admin's policy file, and any string as a selector. No
//! panic; a policy that loads has a consent that names only its own features.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (String, String)| {
    let (policy, selector) = input;
    let _ = consent_proxy::config::selector(&selector);
    let dir = std::env::temp_dir();
    if let Ok(config) = consent_proxy::config::load_str("fuzz.toml", &policy, &dir) {
        let features = &config.policy.features;
        for granted in &config.policy.consent.granted {
            assert!(
                features.iter().any(|f| &f.name == granted),
                "consent grants {granted}, which no feature is"
            );
        }
    }
});
