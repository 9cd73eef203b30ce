//! Refusals the HTTP/2 layer makes itself. h2 resets a stream whose request head is malformed
//! (a bad `:path`, a `:status` in a request, an upper-case or connection-specific field) with
//! `RST_STREAM(PROTOCOL_ERROR)`, refuses one over the stream limit with `REFUSED_STREAM`, and
//! ends a connection it cannot read with `GOAWAY`: the request never reaches the exchange, so
//! the exchange cannot record it. [`Watched`] reads the frame headers the server writes (only
//! those: no payload but a reset's error code, never a value) and reports each such refusal,
//! to be recorded like any other.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc::UnboundedSender;

const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;

/// A refusal the HTTP/2 layer wrote.
#[derive(Debug, Eq, PartialEq)]
pub(super) enum Refused {
    /// `RST_STREAM` on a stream, with its error code.
    Stream { id: u32, code: u32 },
    /// `GOAWAY` with an error code other than `NO_ERROR`.
    Connection { code: u32 },
}

impl Refused {
    /// The reason, as the audit record states it.
    pub(super) fn reason(&self) -> String {
        match self {
            Refused::Stream { id, code } => format!(
                "HTTP/2 stream {id} reset by the proxy's HTTP/2 layer ({}): the request was \
                 malformed or over the stream limit, and was neither decided nor forwarded",
                code_name(*code)
            ),
            Refused::Connection { code } => format!(
                "HTTP/2 connection closed by the proxy's HTTP/2 layer ({}): what the client sent \
                 could not be read, and was neither decided nor forwarded",
                code_name(*code)
            ),
        }
    }
}

fn code_name(code: u32) -> String {
    match code {
        0x1 => "PROTOCOL_ERROR".into(),
        0x2 => "INTERNAL_ERROR".into(),
        0x3 => "FLOW_CONTROL_ERROR".into(),
        0x6 => "FRAME_SIZE_ERROR".into(),
        0x7 => "REFUSED_STREAM".into(),
        0x9 => "COMPRESSION_ERROR".into(),
        0xb => "ENHANCE_YOUR_CALM".into(),
        other => format!("error code {other:#x}"),
    }
}

/// Whether a stream reset with `code` is a refusal of a request (not the end of one the
/// exchange answered, `NO_ERROR` or `CANCEL`, or a late frame, `STREAM_CLOSED`).
fn refuses(code: u32) -> bool {
    matches!(code, 0x1 | 0x2 | 0x3 | 0x6 | 0x7 | 0x9 | 0xb)
}

/// Where the server's byte stream is, frame by frame.
#[derive(Debug)]
enum Framing {
    /// Reading the first frame header, which says whether this is HTTP/2 at all: a server's
    /// HTTP/2 starts with SETTINGS on stream 0, an HTTP/1 response with `HTTP/` (type `P`).
    First(Collected<9>),
    /// HTTP/1: nothing to read.
    Off,
    /// Reading a frame header (the bytes so far).
    Head(Collected<9>),
    /// Reading a frame's payload, its first bytes kept (all a reset's or a `GOAWAY`'s decoding
    /// needs).
    Payload {
        kind: u8,
        stream: u32,
        left: usize,
        got: Collected<8>,
    },
}

/// Up to `N` bytes, collected across writes without allocating.
#[derive(Debug)]
struct Collected<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> Default for Collected<N> {
    fn default() -> Self {
        Collected {
            bytes: [0; N],
            len: 0,
        }
    }
}

impl<const N: usize> Collected<N> {
    /// Take what fits of `from`; returns how many bytes were taken.
    fn fill(&mut self, from: &[u8]) -> usize {
        let take = (N - self.len).min(from.len());
        self.bytes[self.len..self.len + take].copy_from_slice(&from[..take]);
        self.len += take;
        take
    }

    fn full(&self) -> bool {
        self.len == N
    }

    fn get(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The server's side of a connection, watched for the refusals its HTTP/2 layer writes.
pub(super) struct Watched<IO> {
    io: IO,
    framing: Framing,
    report: UnboundedSender<Refused>,
}

impl<IO> Watched<IO> {
    pub(super) fn new(io: IO, report: UnboundedSender<Refused>) -> Self {
        Watched {
            io,
            framing: Framing::First(Collected::default()),
            report,
        }
    }

    /// Follow the frames in `bytes`, written by the server.
    fn written(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.framing {
                Framing::Off => return,
                Framing::First(head) | Framing::Head(head) => {
                    bytes = &bytes[head.fill(bytes)..];
                    if head.full() {
                        self.framing = self.after_head();
                    }
                }
                Framing::Payload {
                    kind,
                    stream,
                    left,
                    got,
                } => {
                    let take = (*left).min(bytes.len());
                    got.fill(&bytes[..take]);
                    *left -= take;
                    bytes = &bytes[take..];
                    if *left == 0 {
                        if let Some(refused) = decode(*kind, *stream, got.get()) {
                            let _ = self.report.send(refused);
                        }
                        self.framing = Framing::Head(Collected::default());
                    }
                }
            }
        }
    }

    /// The state after a complete frame header.
    fn after_head(&self) -> Framing {
        let (Framing::First(head) | Framing::Head(head)) = &self.framing else {
            return Framing::Off;
        };
        let head = &head.bytes;
        let first = matches!(self.framing, Framing::First(_));
        if first && (head[3] != SETTINGS || head[5..] != [0, 0, 0, 0]) {
            return Framing::Off;
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let kind = head[3];
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        Framing::Payload {
            kind,
            stream,
            left: len,
            got: Collected::default(),
        }
    }
}

/// The refusal a kept frame states, if it is one.
fn decode(kind: u8, stream: u32, got: &[u8]) -> Option<Refused> {
    let word = |at: usize| {
        got.get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    match kind {
        RST_STREAM => word(0)
            .filter(|code| refuses(*code))
            .map(|code| Refused::Stream { id: stream, code }),
        GOAWAY => word(4)
            .filter(|code| *code != 0)
            .map(|code| Refused::Connection { code }),
        _ => None,
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            this.written(&buf[..*n]);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled {
            // What was written is the first `n` bytes across the buffers, in order.
            let mut left = *n;
            for buf in bufs {
                if left == 0 {
                    break;
                }
                let take = left.min(buf.len());
                this.written(&buf[..take]);
                left -= take;
            }
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, 0];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// What a watcher reports for `chunks` written in turn.
    fn reported(chunks: &[Vec<u8>]) -> Vec<Refused> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut w = Watched::new((), tx);
        for chunk in chunks {
            w.written(chunk);
        }
        drop(w);
        let mut out = Vec::new();
        while let Ok(r) = rx.try_recv() {
            out.push(r);
        }
        out
    }

    #[test]
    fn refusals_are_read_from_the_frames_written_even_when_split() {
        let mut wire = frame(SETTINGS, 0, &[0, 3, 0, 0, 0, 100]);
        wire.extend(frame(0x1, 1, b"response head"));
        wire.extend(frame(0x0, 1, &[7u8; 300]));
        wire.extend(frame(RST_STREAM, 3, &1u32.to_be_bytes()));
        wire.extend(frame(RST_STREAM, 5, &8u32.to_be_bytes())); // CANCEL: not a refusal
        wire.extend(frame(RST_STREAM, 7, &7u32.to_be_bytes()));
        wire.extend(frame(GOAWAY, 0, &[0, 0, 0, 7, 0, 0, 0, 9]));
        let want = vec![
            Refused::Stream { id: 3, code: 1 },
            Refused::Stream { id: 7, code: 7 },
            Refused::Connection { code: 9 },
        ];
        assert_eq!(reported(std::slice::from_ref(&wire)), want);
        for cut in [1, 5, 9, 10, 330, wire.len() - 3] {
            let (a, b) = wire.split_at(cut);
            assert_eq!(reported(&[a.to_vec(), b.to_vec()]), want, "cut at {cut}");
        }
        let bytewise: Vec<Vec<u8>> = wire.iter().map(|b| vec![*b]).collect();
        assert_eq!(reported(&bytewise), want);
        // A clean GOAWAY is no refusal; HTTP/1 is not read at all.
        let mut clean = frame(SETTINGS, 0, &[]);
        clean.extend(frame(GOAWAY, 0, &[0; 8]));
        assert!(reported(&[clean]).is_empty());
        assert!(reported(&[frame(RST_STREAM, 1, &1u32.to_be_bytes())]).is_empty());
        assert!(reported(&[b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()]).is_empty());
    }
}
