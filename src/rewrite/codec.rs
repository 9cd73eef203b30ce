//! Content codings of request bodies: undone so a rule can read the body, and done again, in the
//! same order, after a rewrite. Pure: bytes in, bytes out.
//!
//! `gzip` (multi-member, as Go's reader reads it), `deflate` (zlib as RFC 9110 says, or raw
//! deflate as some clients send it; the same framing is written back), `br` and `zstd`, stacked
//! in any order. Every stage is bounded by `max_body_bytes`, so a small body that decodes into a
//! large one (a decompression bomb) is refused without ever being held whole. Bytes after the end
//! of a zlib or raw deflate stream are refused: a receiver could read them.

use std::io::{self, Read, Write};

use bytes::Bytes;
use http::header::CONTENT_ENCODING;
use http::HeaderMap;

use super::error::RewriteError;

/// One content coding, as found on the body.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Coding {
    Gzip,
    /// `deflate` with the zlib wrapper.
    Zlib,
    /// `deflate` without a wrapper.
    RawDeflate,
    Brotli,
    Zstd,
}

/// The codings named by every `Content-Encoding` header, in the order they were applied
/// (`identity` left out). An unknown coding cannot be inspected.
fn named(headers: &HeaderMap) -> Result<Vec<&'static str>, RewriteError> {
    let mut out = Vec::new();
    for value in headers.get_all(CONTENT_ENCODING) {
        let text = value.to_str().map_err(|_| RewriteError::Encoded)?;
        for name in text.split(',').map(str::trim) {
            let name = match name.to_ascii_lowercase().as_str() {
                "identity" | "" => continue,
                "gzip" | "x-gzip" => "gzip",
                "deflate" => "deflate",
                "br" => "br",
                "zstd" => "zstd",
                _ => return Err(RewriteError::Encoded),
            };
            out.push(name);
        }
    }
    Ok(out)
}

/// Undo the body's content codings; returns the plain body and the codings found (to redo them).
pub fn decode(
    headers: &HeaderMap,
    body: &Bytes,
    max: u64,
) -> Result<(Bytes, Vec<Coding>), RewriteError> {
    let names = named(headers)?;
    if names.is_empty() {
        return Ok((body.clone(), Vec::new()));
    }
    let mut codings = Vec::with_capacity(names.len());
    let mut data = body.to_vec();
    for name in names.iter().rev() {
        let (plain, coding) = match *name {
            "gzip" => (
                bounded(flate2::bufread::MultiGzDecoder::new(&data[..]), max)?,
                Coding::Gzip,
            ),
            "deflate" if is_zlib(&data) => (inflate_all(&data, max, Coding::Zlib)?, Coding::Zlib),
            "deflate" => (
                inflate_all(&data, max, Coding::RawDeflate)?,
                Coding::RawDeflate,
            ),
            "br" => (
                bounded(brotli::Decompressor::new(&data[..], 4096), max)?,
                Coding::Brotli,
            ),
            _ => (
                bounded(
                    zstd::stream::read::Decoder::new(&data[..])
                        .map_err(|_| RewriteError::BadEncoding)?,
                    max,
                )?,
                Coding::Zstd,
            ),
        };
        data = plain;
        codings.push(coding);
    }
    codings.reverse();
    Ok((Bytes::from(data), codings))
}

/// Apply `codings` (in the order they were found) to a plain body.
pub fn encode(plain: &[u8], codings: &[Coding]) -> Vec<u8> {
    let mut data = plain.to_vec();
    for coding in codings {
        data = encode_one(&data, *coding).expect("encoding into memory cannot fail");
    }
    data
}

fn encode_one(data: &[u8], coding: Coding) -> io::Result<Vec<u8>> {
    let level = flate2::Compression::default();
    match coding {
        Coding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), level);
            e.write_all(data)?;
            e.finish()
        }
        Coding::Zlib => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), level);
            e.write_all(data)?;
            e.finish()
        }
        Coding::RawDeflate => {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), level);
            e.write_all(data)?;
            e.finish()
        }
        Coding::Brotli => {
            let mut out = Vec::new();
            {
                let mut e = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                e.write_all(data)?;
            }
            Ok(out)
        }
        Coding::Zstd => zstd::stream::encode_all(data, 3),
    }
}

/// A zlib header: compression method 8 and a header checksum that divides by 31 (RFC 1950).
fn is_zlib(data: &[u8]) -> bool {
    match data {
        [cmf, flg, ..] => cmf & 0x0f == 8 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0,
        _ => false,
    }
}

/// Inflate one stream of `coding` (zlib or raw deflate) that must span the whole input.
fn inflate_all(data: &[u8], max: u64, coding: Coding) -> Result<Vec<u8>, RewriteError> {
    let rest = |r: &[u8]| r.is_empty();
    if coding == Coding::Zlib {
        let mut d = flate2::bufread::ZlibDecoder::new(data);
        let out = bounded(&mut d, max)?;
        rest(d.into_inner()).then_some(out)
    } else {
        let mut d = flate2::bufread::DeflateDecoder::new(data);
        let out = bounded(&mut d, max)?;
        rest(d.into_inner()).then_some(out)
    }
    .ok_or(RewriteError::BadEncoding)
}

/// Read a decoder to its end, refusing more than `max` bytes of output.
fn bounded(reader: impl Read, max: u64) -> Result<Vec<u8>, RewriteError> {
    let mut out = Vec::new();
    reader
        .take(max.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|_| RewriteError::BadEncoding)?;
    if out.len() as u64 > max {
        return Err(RewriteError::TooLarge);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(CONTENT_ENCODING, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    /// `decode` of a body held in a `Vec`, bounded at 1 MiB, with the plain body as a `Vec`.
    fn dec(values: &[&str], body: &[u8]) -> Result<(Vec<u8>, Vec<Coding>), RewriteError> {
        decode(&headers(values), &Bytes::copy_from_slice(body), 1 << 20)
            .map(|(plain, codings)| (plain.to_vec(), codings))
    }

    const PLAIN: &[u8] = br#"{"message":"secret","badge":1}"#;

    #[test]
    fn every_coding_and_stack_round_trips() {
        for (values, want) in [
            (vec!["gzip"], vec![Coding::Gzip]),
            (vec!["x-gzip"], vec![Coding::Gzip]),
            (vec!["deflate"], vec![Coding::Zlib]),
            (vec!["br"], vec![Coding::Brotli]),
            (vec!["zstd"], vec![Coding::Zstd]),
            (vec!["gzip, br"], vec![Coding::Gzip, Coding::Brotli]),
            (
                vec!["identity", "zstd", "GZIP"],
                vec![Coding::Zstd, Coding::Gzip],
            ),
        ] {
            let wire = encode(PLAIN, &want);
            let (plain, found) = dec(&values, &wire).expect("decodes");
            assert_eq!(plain, PLAIN, "{values:?}");
            assert_eq!(found, want, "{values:?}");
        }
    }

    #[test]
    fn raw_deflate_is_read_and_written_back_raw() {
        let wire = encode(PLAIN, &[Coding::RawDeflate]);
        let (plain, found) = dec(&["deflate"], &wire).expect("decodes");
        assert_eq!((plain.as_slice(), found), (PLAIN, vec![Coding::RawDeflate]));
    }

    #[test]
    fn bombs_unknown_codings_and_garbage_are_refused() {
        let bomb = encode(&vec![b'a'; 10 << 20], &[Coding::Gzip, Coding::Zstd]);
        assert!(bomb.len() < 64 << 10);
        assert_eq!(dec(&["gzip, zstd"], &bomb), Err(RewriteError::TooLarge));
        for (values, body) in [
            (vec!["compress"], PLAIN.to_vec()),
            (vec!["gzip, aes128gcm"], PLAIN.to_vec()),
        ] {
            assert_eq!(dec(&values, &body), Err(RewriteError::Encoded));
        }
        let mut trailing = encode(PLAIN, &[Coding::Zlib]);
        trailing.extend_from_slice(b"more");
        for (values, body) in [
            (vec!["gzip"], PLAIN.to_vec()),
            (vec!["br"], PLAIN.to_vec()),
            (vec!["zstd"], PLAIN.to_vec()),
            (vec!["deflate"], trailing),
        ] {
            assert_eq!(
                dec(&values, &body),
                Err(RewriteError::BadEncoding),
                "{values:?}"
            );
        }
    }

    #[test]
    fn gzip_members_are_all_read() {
        let mut wire = encode(b"{\"a\":1,", &[Coding::Gzip]);
        wire.extend(encode(b"\"message\":\"secret\"}", &[Coding::Gzip]));
        let (plain, _) = dec(&["gzip"], &wire).expect("decodes");
        assert_eq!(plain, br#"{"a":1,"message":"secret"}"#);
    }
}
