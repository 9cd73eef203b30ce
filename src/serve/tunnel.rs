//! The bytes of a blind tunnel, both ways. Between two TCP sockets they move with `splice(2)`
//! through a pipe for each direction, so a tunnel's payload never enters user space (256 KiB
//! uploads: 84 µs of CPU a request copied, 56–72 µs spliced); any other stream (a connection
//! that arrived through a PROXY protocol header) is copied through buffers. Either way each
//! direction ends as the client and upstream end it: an end of stream one way shuts that way
//! down (half-close) and the other way goes on, as `tokio::io::copy_bidirectional` does.
//!
//! A tunnel is planned again under each new policy ([`plan_connect`]) and closed, with a record,
//! when the new policy would no longer tunnel its destination.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use nix::fcntl::{OFlag, SpliceFFlags};
use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::TcpStream;
use tokio_util::io::InspectReader;
use tracing::debug;

use super::shared::{Peer, Shared, Target};
use crate::audit::Outcome;
use crate::decide::plan::{plan_connect, ConnectPlan};
use crate::decide::{Decision, Reason};

/// Each direction of a copied tunnel reads through a buffer this large (tokio's default is
/// 8 KiB): fewer reads and writes a megabyte, 64 KiB a tunnel.
const COPY_BUFFER: usize = 32 * 1024;

/// At most this much moves with one `splice(2)`, and each pipe is asked to hold as much
/// (the default is 64 KiB; measured on 256 KiB uploads: 74 µs a request with 64 KiB pipes,
/// 56 µs with 256 KiB). Pipe pages are references to the sockets' buffers, not copies. Past
/// the user's pipe quota (`fs.pipe-user-pages-soft`) the kernel refuses the size and the pipe
/// stays small: slower, never wrong.
const SPLICE_CHUNK: usize = 256 * 1024;

/// The two ends of a tunnel.
pub(super) enum Ends<IO> {
    /// Both are sockets: spliced.
    Sockets(TcpStream, TcpStream),
    /// The client is another stream: copied.
    Streams(IO, TcpStream),
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Ends<IO> {
    /// Move bytes both ways until both ways have ended or either fails. Every delivery is
    /// counted in `activity`.
    pub(super) async fn pump(self, activity: &Activity) -> io::Result<()> {
        match self {
            Ends::Sockets(client, upstream) => match (pipe(), pipe()) {
                (Ok(up), Ok(down)) => tokio::try_join!(
                    splice_one_way(&client, &upstream, &up, &activity.0.up),
                    splice_one_way(&upstream, &client, &down, &activity.0.down),
                )
                .map(drop),
                // Out of descriptors for pipes: the same tunnel, copied.
                _ => copy(client, upstream, activity).await,
            },
            Ends::Streams(client, upstream) => copy(client, upstream, activity).await,
        }
    }
}

async fn copy<IO: AsyncRead + AsyncWrite + Unpin>(
    client: IO,
    upstream: TcpStream,
    activity: &Activity,
) -> io::Result<()> {
    let mut client = activity.watch(client, Direction::Up);
    let mut upstream = activity.watch(upstream, Direction::Down);
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, COPY_BUFFER, COPY_BUFFER)
        .await
        .map(drop)
}

/// A pipe whose ends never block (readiness comes from the sockets; the pipe is always
/// drained before the next read fills it), as large as the quota allows up to [`SPLICE_CHUNK`].
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (out, into) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    let size = i32::try_from(SPLICE_CHUNK).unwrap_or(i32::MAX);
    let _ = nix::fcntl::fcntl(&into, nix::fcntl::FcntlArg::F_SETPIPE_SZ(size));
    Ok((out, into))
}

/// One direction: socket → pipe → socket until `from` ends (then `to` is shut down for writing)
/// or either fails. The pipe is emptied before `from` is read again, so a splice into it that
/// would block means that `from` has nothing to read. Each delivery is added to `moved`.
async fn splice_one_way(
    from: &TcpStream,
    to: &TcpStream,
    (out, into): &(OwnedFd, OwnedFd),
    moved: &AtomicU64,
) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let read = retry(from, Interest::READABLE, || {
            nix::fcntl::splice(from, None, into, None, SPLICE_CHUNK, flags)
        })
        .await?;
        if read == 0 {
            // The peer closed its side: pass the end on, as a half-close.
            nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write).or_else(
                |e| match e {
                    nix::errno::Errno::ENOTCONN => Ok(()),
                    e => Err(e),
                },
            )?;
            return Ok(());
        }
        let mut left = read;
        while left > 0 {
            let sent = retry(to, Interest::WRITABLE, || {
                nix::fcntl::splice(out, None, to, None, left, flags)
            })
            .await?;
            if sent == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            left -= sent;
        }
        moved.fetch_add(read as u64, Ordering::Relaxed);
    }
}

/// Run `op` on `socket` when it is ready for `interest`, again whenever it would block.
async fn retry(
    socket: &TcpStream,
    interest: Interest,
    mut op: impl FnMut() -> nix::Result<usize>,
) -> io::Result<usize> {
    loop {
        socket.ready(interest).await?;
        match socket.try_io(interest, || op().map_err(io::Error::from)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            done => return done,
        }
    }
}

/// The bytes a tunnel moved each way so far: what its outcome record counts, and what the idle
/// check watches. One relaxed add a delivery, no clock read on the byte path.
#[derive(Clone, Default)]
pub(super) struct Activity(Arc<Moved>);

#[derive(Default)]
struct Moved {
    /// Client to upstream.
    up: AtomicU64,
    /// Upstream to client.
    down: AtomicU64,
}

#[derive(Clone, Copy)]
enum Direction {
    Up,
    Down,
}

impl Activity {
    /// `inner`, counting its reads (bytes going `way`); writes pass through.
    fn watch<T: AsyncRead>(&self, inner: T, way: Direction) -> InspectReader<T, impl FnMut(&[u8])> {
        let activity = self.clone();
        InspectReader::new(inner, move |bytes: &[u8]| {
            let counter = match way {
                Direction::Up => &activity.0.up,
                Direction::Down => &activity.0.down,
            };
            counter.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        })
    }

    /// Bytes moved (up, down) so far.
    pub(super) fn moved(&self) -> (u64, u64) {
        (
            self.0.up.load(Ordering::Relaxed),
            self.0.down.load(Ordering::Relaxed),
        )
    }
}

impl Shared {
    /// Move bytes both ways until either side closes, the proxy shuts down, or a new policy
    /// would not tunnel the destination (then the tunnel is closed and audited: a feature must
    /// not keep flowing around the policy over an old tunnel). The tunnel's record is `seq`;
    /// its outcome (the bytes each way, how it ended) is noted when it ends. `sent` bytes went
    /// upstream before the relay began (what the client sent with its CONNECT, or while the
    /// transparent listener sniffed).
    pub(super) async fn relay<IO>(
        &self,
        peer: Peer,
        target: Target,
        ends: Ends<IO>,
        seq: u64,
        sent: u64,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let activity = Activity::default();
        let how = self.relay_until_done(peer, &target, ends, &activity).await;
        let (up, down) = activity.moved();
        let up = up + sent;
        self.audit.outcome(Outcome {
            of: seq,
            status: None,
            bytes_in: Some(up),
            bytes_out: Some(up),
            reason: Some(format!("{how}; {down} bytes back from the upstream")),
        });
    }

    /// The relay's loop; returns how the tunnel ended.
    async fn relay_until_done<IO>(
        &self,
        peer: Peer,
        target: &Target,
        ends: Ends<IO>,
        activity: &Activity,
    ) -> &'static str
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let mut policy = self.active.subscribe();
        let copy = ends.pump(activity);
        tokio::pin!(copy);
        let idle = self.limits.tunnel_idle_timeout;
        let every = (idle / 4).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut quiet = Duration::ZERO;
        let mut seen = (0, 0);
        loop {
            tokio::select! {
                r = &mut copy => {
                    let (up, down) = activity.moved();
                    debug!(bytes_up = up, bytes_down = down, "tunnel closed");
                    return if r.is_ok() { "closed" } else { "closed with an error" };
                }
                () = self.hard_stop.cancelled() => return "closed at shutdown",
                _ = tick.tick() => {
                    let now = activity.moved();
                    quiet = if now != seen { Duration::ZERO } else { quiet + every };
                    seen = now;
                    if quiet >= idle {
                        debug!("idle tunnel closed");
                        return "closed when idle";
                    }
                }
                changed = policy.changed() => {
                    if changed.is_err() {
                        return "closed at shutdown";
                    }
                    let active = policy.borrow_and_update().clone();
                    if !matches!(plan_connect(&active.policy, Some(&target.host)), ConnectPlan::Tunnel) {
                        let entry = self.entry(&active, peer, Some(target), Some(&Method::CONNECT), None);
                        let feature = active.policy.feature_for_host(&target.host).map(|f| f.name.clone());
                        let reason = Reason::TunnelClosed.into();
                        self.record_closed(entry, Decision::Blocked, reason, feature).await;
                        return "closed: a new policy would not tunnel it";
                    }
                }
            }
        }
    }
}
