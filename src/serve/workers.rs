//! The threads that serve connections: one single-threaded runtime a core. An accepted
//! connection is handed to one of them, round robin, and stays there with everything it does
//! (its requests, the upstream connections they take from that thread's pool): no task of it is
//! woken from another thread. On the work-stealing runtime a request and the pooled upstream
//! connection it used could sit on different threads and wake each other across them; served
//! this way a small request costs about 5 % less CPU in the shared harness (README
//! "Performance").

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::{Builder, Handle};
use tokio_util::sync::CancellationToken;

use crate::upstream;

/// Worker threads; told to stop when dropped (what they still run is dropped with them).
pub(super) struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    stop: CancellationToken,
}

impl Workers {
    /// One worker a core the process may use.
    pub(super) fn start() -> io::Result<Workers> {
        let n = std::thread::available_parallelism().map_or(1, usize::from);
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("consent-proxy-worker-{i}"))
                .spawn(move || {
                    upstream::use_pool(i);
                    runtime.block_on(stop.cancelled());
                })?;
        }
        Ok(Workers {
            handles,
            next: AtomicUsize::new(0),
            stop,
        })
    }

    pub(super) fn len(&self) -> usize {
        self.handles.len()
    }

    /// Run `fut` on the next worker. Sockets it uses must be registered from inside it (a
    /// socket belongs to the runtime it was registered with).
    pub(super) fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        drop(self.handles[i].spawn(fut));
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Not joined: the last holder of the proxy's state may be a task on a worker.
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_goes_round_robin_to_threads_of_its_own() {
        let workers = Workers::start().expect("workers start");
        let n = workers.len();
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..2 * n {
            let tx = tx.clone();
            workers.spawn(async move {
                let name = std::thread::current().name().map(str::to_string);
                let _ = tx.send(name);
            });
        }
        let mut names: Vec<String> = rx.iter().take(2 * n).flatten().collect();
        names.sort();
        let mut expected: Vec<String> = (0..n)
            .flat_map(|i| std::iter::repeat_n(format!("consent-proxy-worker-{i}"), 2))
            .collect();
        expected.sort();
        assert_eq!(names, expected);
    }
}
