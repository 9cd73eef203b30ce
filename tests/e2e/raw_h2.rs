//! A raw HTTP/2 client, for what real clients will not send: header fields written as given
//! (a `:path` with a space, a `:status` in a request), HPACK literals without Huffman coding.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// How the server answered stream 1.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Answer {
    /// A response head (the HPACK block is not decoded: that it came is what counts).
    Response,
    /// `RST_STREAM` with this error code (1: PROTOCOL_ERROR).
    Reset(u32),
    /// `GOAWAY` with this error code.
    GoAway(u32),
    /// The connection closed, or nothing came in time.
    Nothing,
}

/// Send one request on stream 1 of a fresh HTTP/2 connection over `io` (TLS with ALPN `h2`
/// done): `fields` in order as HPACK literals, then `body` as one DATA frame if not empty.
pub async fn request<S>(io: &mut S, fields: &[(&str, &str)], body: &[u8]) -> Answer
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0x00); // literal without indexing, new name
        integer(&mut block, name.len());
        block.extend_from_slice(name.as_bytes());
        integer(&mut block, value.len());
        block.extend_from_slice(value.as_bytes());
    }
    let mut out = PREFACE.to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    let flags = END_HEADERS | if body.is_empty() { END_STREAM } else { 0 };
    frame(&mut out, HEADERS, flags, 1, &block);
    if !body.is_empty() {
        frame(&mut out, DATA, END_STREAM, 1, body);
    }
    io.write_all(&out).await.expect("write");
    let read = async {
        loop {
            let mut head = [0u8; 9];
            if io.read_exact(&mut head).await.is_err() {
                return Answer::Nothing;
            }
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            if io.read_exact(&mut payload).await.is_err() {
                return Answer::Nothing;
            }
            match kind {
                SETTINGS if flags & 0x1 == 0 => {
                    let mut ack = Vec::new();
                    frame(&mut ack, SETTINGS, 0x1, 0, &[]);
                    let _ = io.write_all(&ack).await;
                }
                HEADERS if stream == 1 => return Answer::Response,
                RST_STREAM if stream == 1 => {
                    return Answer::Reset(u32::from_be_bytes([
                        payload[0], payload[1], payload[2], payload[3],
                    ]))
                }
                GOAWAY => {
                    return Answer::GoAway(u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ]))
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or(Answer::Nothing)
}

/// An HPACK integer with a 7-bit prefix (the H bit clear: no Huffman coding).
fn integer(out: &mut Vec<u8>, mut n: usize) {
    if n < 127 {
        out.push(n as u8);
        return;
    }
    out.push(127);
    n -= 127;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}
