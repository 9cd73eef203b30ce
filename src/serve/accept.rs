//! The accept loop every listener runs (as mini-redis does): bounded connections, each in a
//! tracked task with its own span, until shutdown; and serving a connection until it ends or,
//! on shutdown, until what is in flight is answered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{warn, Instrument};

use super::shared::Shared;
use crate::metrics::ListenerLabels;

/// Accept connections on `listener` until shutdown, at most `max_connections` at once, each
/// served by `serve` in a tracked task with its own span, on one of the worker threads.
pub(super) async fn accept_each<F, Fut>(
    shared: Arc<Shared>,
    listener: TcpListener,
    name: &'static str,
    serve: F,
) where
    F: Fn(Arc<Shared>, SocketAddr, TcpStream) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(shared.limits.max_connections));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shared.token.cancelled() => return,
        };
        let (tcp, client) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        shared
            .metrics
            .connections
            .get_or_create(&ListenerLabels { listener: name })
            .inc();
        // The socket moves to the worker's runtime: out of this one's, into that one's there.
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                warn!(error = %e, "accepted connection could not be handed to a worker");
                continue;
            }
        };
        let span = tracing::info_span!("conn", client = %client, listener = name);
        let s = shared.clone();
        let served = async move {
            match TcpStream::from_std(tcp) {
                Ok(tcp) => serve(s, client, tcp).await,
                Err(e) => warn!(error = %e, "a worker could not take an accepted connection"),
            }
            drop(permit);
        };
        shared
            .workers
            .spawn(shared.tracker.track_future(served.instrument(span)));
    }
}

/// Serve a connection until it ends; on shutdown, let it finish what is in flight.
pub(super) async fn until_cancelled<C, E>(
    conn: C,
    token: &CancellationToken,
    graceful_shutdown: impl FnOnce(std::pin::Pin<&mut C>),
) -> Result<(), E>
where
    C: std::future::Future<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        () = token.cancelled() => {
            graceful_shutdown(conn.as_mut());
            conn.await
        }
    }
}
