//! Names as the receivers compare them. The push proxy and the telemetry receivers are Go
//! services, and Go's `encoding/json` binds an object member to a struct field when the two names
//! are equal under Unicode simple case folding: ASCII case, and also `ſ` (U+017F) ~ `s` and the
//! Kelvin sign `K` (U+212A) ~ `k`. A rule that names `channel_name` must therefore catch
//! `Channel_Name` and `channel_nAme` as well; [`fold`] gives every such spelling one form.

use std::borrow::Cow;

use regex_syntax::hir::{ClassUnicode, ClassUnicodeRange};

/// The folded form of `name`: each character replaced by the smallest character of its simple
/// case-folding orbit (what Go's `encoding/json` compares). Two names bind to the same field
/// exactly when their folded forms are equal.
pub fn fold(name: &str) -> Cow<'_, str> {
    if name
        .bytes()
        .all(|b| b.is_ascii() && !b.is_ascii_lowercase())
    {
        return Cow::Borrowed(name);
    }
    Cow::Owned(name.chars().map(fold_char).collect())
}

fn fold_char(c: char) -> char {
    if c.is_ascii() {
        return c.to_ascii_uppercase();
    }
    let mut orbit = ClassUnicode::new([ClassUnicodeRange::new(c, c)]);
    orbit.case_fold_simple();
    orbit.ranges().first().map_or(c, |r| r.start())
}

/// Whether `name` matches a member-name `pattern` where `*` stands for any run of characters;
/// both are compared folded.
pub fn glob(pattern: &str, name: &str) -> bool {
    let (pattern, name) = (fold(pattern), fold(name));
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, rest) = parts.split_first().expect("split yields at least one part");
    let Some(mut tail) = name.strip_prefix(first) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return tail.is_empty();
    };
    for part in middle {
        match tail.find(part) {
            Some(at) => tail = &tail[at + part.len()..],
            None => return false,
        }
    }
    tail.len() >= last.len() && tail.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_as_go_encoding_json_binds() {
        for (a, b, same) in [
            ("channel_name", "CHANNEL_NAME", true),
            ("channel_name", "Channel_Name", true),
            ("sender_name", "\u{17f}ender_name", true),
            ("ack_id", "ac\u{212a}_id", true),
            ("message", "messag", false),
            ("message", "m\u{e9}ssage", false),
            ("\u{e9}t\u{e9}", "\u{c9}T\u{c9}", true),
            ("user_id", "user-id", false),
        ] {
            assert_eq!(fold(a) == fold(b), same, "{a} ~ {b}");
        }
        assert!(matches!(fold("ABC_1"), Cow::Borrowed(_)));
    }

    #[test]
    fn globs_match_folded_names() {
        for (pattern, name, hit) in [
            ("feature_*", "feature_ldap", true),
            ("feature_*", "FEATURE_LDAP", true),
            ("feature_*", "feature_", true),
            ("feature_*", "features", false),
            ("feature_*", "xfeature_a", false),
            ("*_id", "ack_id", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXcYb", false),
            ("a*a", "a", false),
            ("*", "", true),
        ] {
            assert_eq!(glob(pattern, name), hit, "{pattern} ~ {name}");
        }
    }
}
