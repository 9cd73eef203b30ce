//! Rules that apply only when (or unless) a member of the body holds a value.

use super::*;

/// A rule with conditions, as a policy's rule carries them.
struct Conditional(Action, Vec<Condition>);

impl Guarded for Conditional {
    fn action(&self) -> &Action {
        &self.0
    }
    fn conditions(&self) -> &[Condition] {
        &self.1
    }
}

#[test]
fn conditions_on_a_member_decide_whether_a_rule_applies() {
    let condition = |values: &[&str], negated| {
        Condition::new(
            json("$.type"),
            values.iter().map(|v| v.to_string()).collect(),
            negated,
        )
        .expect("a member path")
    };
    let replace = || Action::Replace(vec![(json("$.message"), "new message".into())]);
    let when_message = Conditional(replace(), vec![condition(&["message"], false)]);
    let unless_notice = Conditional(replace(), vec![condition(&["session", "test"], true)]);
    let cases: [(&Conditional, &str, Result<bool, RewriteError>); 9] = [
        (
            &when_message,
            r#"{"type":"message","message":"a: hi"}"#,
            Ok(true),
        ),
        (
            &when_message,
            r#"{"type":"session","message":"expired"}"#,
            Ok(false),
        ),
        (&when_message, r#"{"message":"a: hi"}"#, Ok(false)),
        (&unless_notice, r#"{"message":"a: hi"}"#, Ok(true)),
        (
            &unless_notice,
            r#"{"type":"test","message":"test"}"#,
            Ok(false),
        ),
        (&unless_notice, r#"{"type":7,"message":"a: hi"}"#, Ok(true)),
        // Spelt as Go binds it: `Type` is the member `type`.
        (
            &when_message,
            r#"{"Type":"message","message":"a: hi"}"#,
            Ok(true),
        ),
        // Two members a receiver binds to `type`: which one it reads is not ours to guess.
        (
            &unless_notice,
            r#"{"type":"session","Type":"message","message":"a: hi"}"#,
            Err(RewriteError::DuplicateKey),
        ),
        (&when_message, "type=message", Err(RewriteError::NotJson)),
    ];
    for engine in [Engine::Spans, Engine::Tree] {
        for (rule, body, want) in &cases {
            let mut m = msg(None, &[], body);
            let got =
                apply_with(&[*rule], &mut m, 1 << 20, engine, None).map(|e| !e.replaced.is_empty());
            assert_eq!(&got, want, "{body} ({engine:?})");
        }
    }
    assert!(Condition::new(json("$.batch[*].event"), vec!["x".into()], false).is_err());
    assert!(Condition::new(Selector::Query("type".into()), vec!["x".into()], false).is_err());
    assert!(Condition::new(json("$.type"), vec![], false).is_err());
}
