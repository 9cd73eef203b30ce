//! Query strings and urlencoded form bodies as parameter pieces: removed, replaced or kept by
//! name, every untouched piece keeping its exact bytes. Pure.

use super::error::RewriteError;
use super::fold::fold;

/// `a=1&b=2;c` pieces with their original bytes and separators. Names are compared as a lenient
/// receiver could read them: split on `&` and `;` (Go before 1.17, and many others, split on
/// both), `+` and `%XX` decoded, case folded ([`fold`]). A piece whose name cannot be read one
/// way only (bad percent-encoding, an empty name before `=`, control characters, bytes that are
/// not UTF-8) makes the whole string unreadable: it is refused, never guessed at.
pub(super) struct Params<'s> {
    /// Each piece with the separator before it (none before the first).
    pieces: Vec<(Option<char>, &'s str)>,
    replaced: Vec<(usize, String)>,
}

impl<'s> Params<'s> {
    pub(super) fn parse(text: &'s str) -> Result<Self, ()> {
        let mut pieces = Vec::new();
        let mut sep = None;
        let mut rest = text;
        loop {
            let end = rest.find(['&', ';']).unwrap_or(rest.len());
            let piece = &rest[..end];
            Self::name(piece)?;
            pieces.push((sep, piece));
            if end == rest.len() {
                break;
            }
            sep = rest[end..].chars().next();
            rest = &rest[end + 1..];
        }
        Ok(Params {
            pieces,
            replaced: Vec::new(),
        })
    }

    /// The folded, decoded name of a piece; `None` for an empty piece.
    pub(super) fn name(piece: &str) -> Result<Option<String>, ()> {
        Ok(Self::decoded(piece)?.map(|n| fold(&n).into_owned()))
    }

    /// The decoded name of a piece, exactly as `url.ParseQuery` reads it; `None` for an empty
    /// piece.
    fn decoded(piece: &str) -> Result<Option<String>, ()> {
        if piece.is_empty() {
            return Ok(None);
        }
        let raw = piece.split('=').next().unwrap_or_default();
        let bytes = raw.as_bytes();
        if raw.is_empty() {
            return Err(());
        }
        for (i, b) in bytes.iter().enumerate() {
            if *b == b'%'
                && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
            {
                return Err(());
            }
        }
        let decoded: Vec<u8> =
            percent_encoding::percent_decode(raw.replace('+', " ").as_bytes()).collect();
        let name = String::from_utf8(decoded).map_err(|_| ())?;
        if name.chars().any(char::is_control) {
            return Err(());
        }
        Ok(Some(name))
    }

    /// The decoded names of the pieces (exactly, as `url.ParseQuery` reads them).
    pub(super) fn names(&self) -> Vec<String> {
        self.pieces
            .iter()
            .filter_map(|(_, p)| Self::decoded(p).ok().flatten())
            .collect()
    }

    pub(super) fn is(piece: &str, name: &str) -> bool {
        Self::name(piece).ok().flatten().as_deref() == Some(&*fold(name))
    }

    pub(super) fn remove(&mut self, name: &str) -> bool {
        let before = self.pieces.len();
        self.pieces.retain(|(_, p)| !Self::is(p, name));
        self.pieces.len() != before
    }

    pub(super) fn replace(&mut self, name: &str, value: &str) -> bool {
        let mut hit = false;
        for (i, (_, p)) in self.pieces.iter().enumerate() {
            if Self::is(p, name) {
                let raw_name = p.split('=').next().unwrap_or_default();
                let encoded: String = form_urlencoded::byte_serialize(value.as_bytes()).collect();
                let new = format!("{raw_name}={encoded}");
                if *p != new {
                    self.replaced.push((i, new));
                    hit = true;
                }
            }
        }
        hit
    }

    /// Keep only the pieces whose name is exactly one of `names`: Go's `url.Values` is a map
    /// keyed by the exact decoded name, so `SID` or `ſid` is another parameter than `sid` and an
    /// allowlist that folded would let it through.
    pub(super) fn keep_only(&mut self, names: &[&str]) -> usize {
        let before = self.pieces.len();
        self.pieces.retain(|(_, p)| {
            p.is_empty()
                || Self::decoded(p)
                    .ok()
                    .flatten()
                    .is_some_and(|d| names.contains(&d.as_str()))
        });
        before - self.pieces.len()
    }
}

pub(super) fn query_edit(r: Result<bool, ()>) -> Result<bool, RewriteError> {
    r.map_err(|()| RewriteError::AmbiguousQuery)
}

pub(super) fn form_edit(r: Result<bool, ()>) -> Result<bool, RewriteError> {
    r.map_err(|()| RewriteError::AmbiguousForm)
}

/// Run `f` over the parameters of `slot`, writing them back if it reports a change. An empty
/// result becomes `None` (no `?` left behind).
pub(super) fn edit_params(
    slot: &mut Option<String>,
    f: impl FnOnce(&mut Params<'_>) -> bool,
) -> Result<bool, ()> {
    let Some(text) = slot.as_deref() else {
        return Ok(false);
    };
    let mut params = Params::parse(text)?;
    if !f(&mut params) {
        return Ok(false);
    }
    let Params { pieces, replaced } = params;
    let mut out: Vec<(Option<char>, String)> = pieces
        .into_iter()
        .map(|(sep, p)| (sep, p.to_string()))
        .collect();
    for (i, new) in replaced {
        out[i].1 = new;
    }
    let mut joined = String::new();
    for (i, (sep, piece)) in out.iter().enumerate() {
        if i > 0 {
            joined.push(sep.unwrap_or('&'));
        }
        joined.push_str(piece);
    }
    *slot = if joined.is_empty() {
        None
    } else {
        Some(joined)
    };
    Ok(true)
}
