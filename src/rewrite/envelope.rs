//! Sentry envelopes (`Content-Type: application/x-sentry-envelope`, the body of Sentry's
//! `/api/<project>/envelope/`): a header line, then items, each an item header line and a
//! payload framed by the header's `length` or, without one, by the next newline
//! (<https://develop.sentry.dev/sdk/data-model/envelopes/>). The rules read the envelope header
//! and each item's payload as JSON documents of their own; a payload that changed leaves with its
//! `length` recomputed. An item the rules cannot read (an attachment, or a type this version does
//! not know) refuses the whole envelope: a report the proxy cannot read item by item does not
//! leave. Pure.

use bytes::Bytes;
use serde::Deserialize;

use super::error::RewriteError;
use super::Doc;

/// Item types whose payload is one JSON document (sentry-go's: event, transaction, check_in,
/// log, client_report; and the SDKs' session updates).
const JSON_ITEMS: [&str; 7] = [
    "event",
    "transaction",
    "check_in",
    "log",
    "client_report",
    "session",
    "sessions",
];

/// Whether `content_type` (a header's value) declares an envelope.
pub(super) fn declared(content_type: &[u8]) -> bool {
    let text = String::from_utf8_lossy(content_type);
    let essence = text.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/x-sentry-envelope")
}

/// An envelope whose header and item payloads are documents the rules read.
pub(super) struct Envelope {
    pub(super) header: Part,
    pub(super) items: Vec<Item>,
    /// A newline ended the envelope header.
    header_newline: bool,
}

/// A JSON part: the envelope header, or an item's payload.
pub(super) struct Part {
    /// The document (`None`: the part is empty).
    pub(super) doc: Option<Doc>,
    /// A rule changed it.
    pub(super) changed: bool,
    /// As received.
    raw: Bytes,
}

pub(super) struct Item {
    /// The item header line as received.
    header: Bytes,
    /// The header carries `length` (rewritten when the payload changes).
    framed: bool,
    pub(super) payload: Part,
    /// A newline followed the payload.
    newline: bool,
}

impl Part {
    fn read(
        raw: Bytes,
        read: &impl Fn(&Bytes) -> Result<Doc, RewriteError>,
    ) -> Result<Part, RewriteError> {
        let doc = if raw.is_empty() {
            None
        } else {
            Some(read(&raw)?)
        };
        Ok(Part {
            doc,
            changed: false,
            raw,
        })
    }

    /// The part as it leaves, and whether it changed.
    fn bytes(&self) -> (Bytes, bool) {
        match (&self.doc, self.changed) {
            (Some(doc), true) => match doc.serialize() {
                Some(bytes) => (bytes, true),
                None => (self.raw.clone(), false),
            },
            _ => (self.raw.clone(), false),
        }
    }
}

/// The members of an item header the framing depends on. Relay reads headers with serde's
/// derive, which refuses a repeated `type` or `length`; so does this.
#[derive(Deserialize)]
struct ItemHeader {
    #[serde(rename = "type")]
    kind: String,
    length: Option<u64>,
}

impl Envelope {
    /// Split `raw` into its parts, reading each JSON part with `read` (which checks it as any
    /// JSON body the rules read is checked).
    pub(super) fn parse(
        raw: &Bytes,
        read: impl Fn(&Bytes) -> Result<Doc, RewriteError>,
    ) -> Result<Envelope, RewriteError> {
        let (first, mut at, header_newline) = line(raw, 0);
        let header = Part::read(first, &read)?;
        let mut items = Vec::new();
        while at < raw.len() {
            let (header, next, newline) = line(raw, at);
            if !newline {
                // An item header must be followed by its payload's line.
                return Err(RewriteError::NotEnvelope);
            }
            let parsed: ItemHeader =
                serde_json::from_slice(&header).map_err(|_| RewriteError::NotEnvelope)?;
            if !JSON_ITEMS.contains(&parsed.kind.as_str()) {
                return Err(RewriteError::EnvelopeItem);
            }
            let (payload, end, newline) = match parsed.length {
                Some(len) => {
                    let end = usize::try_from(len)
                        .ok()
                        .and_then(|len| next.checked_add(len))
                        .filter(|end| *end <= raw.len())
                        .ok_or(RewriteError::NotEnvelope)?;
                    match raw.get(end) {
                        None => (raw.slice(next..end), end, false),
                        Some(b'\n') => (raw.slice(next..end), end + 1, true),
                        // Bytes after a framed payload without a newline: readers disagree.
                        Some(_) => return Err(RewriteError::NotEnvelope),
                    }
                }
                None => line(raw, next),
            };
            items.push(Item {
                header,
                framed: parsed.length.is_some(),
                payload: Part::read(payload, &read)?,
                newline,
            });
            at = end;
        }
        Ok(Envelope {
            header,
            items,
            header_newline,
        })
    }

    /// Whether a rule changed a part.
    pub(super) fn changed(&self) -> bool {
        self.header.changed || self.items.iter().any(|i| i.payload.changed)
    }

    /// The envelope as it leaves: changed parts re-serialized, every framed item's `length`
    /// that of its payload as it leaves, every other byte as received.
    pub(super) fn serialize(&self) -> Result<Bytes, RewriteError> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.header.bytes().0);
        if self.header_newline {
            out.push(b'\n');
        }
        for item in &self.items {
            let (payload, changed) = item.payload.bytes();
            match (changed, item.framed) {
                (true, true) => {
                    let mut header: serde_json::Map<String, serde_json::Value> =
                        serde_json::from_slice(&item.header)
                            .map_err(|_| RewriteError::NotEnvelope)?;
                    header.insert("length".into(), payload.len().into());
                    out.extend_from_slice(
                        &serde_json::to_vec(&header).map_err(|_| RewriteError::NotEnvelope)?,
                    );
                }
                _ => out.extend_from_slice(&item.header),
            }
            out.push(b'\n');
            out.extend_from_slice(&payload);
            if item.newline {
                out.push(b'\n');
            }
        }
        Ok(Bytes::from(out))
    }
}

/// The line of `raw` from `at`: its bytes, where the next one starts, and whether a newline
/// ended it (rather than the body).
fn line(raw: &Bytes, at: usize) -> (Bytes, usize, bool) {
    match raw[at..].iter().position(|b| *b == b'\n') {
        Some(n) => (raw.slice(at..at + n), at + n + 1, true),
        None => (raw.slice(at..), raw.len(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_content_type_declares_an_envelope() {
        assert!(declared(b"application/x-sentry-envelope"));
        assert!(declared(b"Application/X-Sentry-Envelope; charset=utf-8"));
        assert!(!declared(b"application/json"));
    }
}
