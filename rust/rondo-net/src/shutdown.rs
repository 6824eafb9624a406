//! One shutdown signal and one completion guard per process, as tokio's mini-redis has them.
//!
//! [`Shutdown`] is cloned into everything that runs in the background: the HTTP and RPC accept
//! loops stop when [`Shutdown::signalled`] resolves, and work that must not be lost (a fold and
//! its bookkeeping, the notices still queued for the other service, a round being closed) is
//! spawned through [`Shutdown::spawn`] / [`Shutdown::spawn_blocking`], so that
//! [`Shutdown::drain`] can wait for it, within a bound, before the process exits.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    signal: CancellationToken,
    tasks: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts shutting down: everything waiting on [`Shutdown::signalled`] wakes.
    pub fn trigger(&self) {
        self.signal.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.signal.is_cancelled()
    }

    /// Resolves once shutdown has started.
    pub fn signalled(&self) -> impl Future<Output = ()> + Send + 'static {
        self.signal.clone().cancelled_owned()
    }

    /// Spawns work that shutdown waits for.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(task)
    }

    /// Spawns blocking work that shutdown waits for. It runs to its end even if the caller
    /// stops waiting for the handle (a dropped request handler, say).
    pub fn spawn_blocking<F, T>(&self, work: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.tasks.spawn_blocking(work)
    }

    /// Triggers shutdown and waits up to `within` for the tracked work to finish. Returns
    /// whether it all did.
    pub async fn drain(&self, within: Duration) -> bool {
        self.trigger();
        self.tasks.close();
        let done = tokio::time::timeout(within, self.tasks.wait())
            .await
            .is_ok();
        if !done {
            tracing::warn!(
                tasks = self.tasks.len(),
                ?within,
                "shutting down with work unfinished"
            );
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn drain_waits_for_tracked_work_and_gives_up_at_the_bound() {
        let shutdown = Shutdown::new();
        let finished = Arc::new(AtomicBool::new(false));
        let flag = finished.clone();
        let signalled = shutdown.signalled();
        shutdown.spawn(async move {
            signalled.await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            flag.store(true, Ordering::SeqCst);
        });
        assert!(shutdown.drain(Duration::from_secs(5)).await);
        assert!(finished.load(Ordering::SeqCst), "drain waited for the task");

        let stuck = Shutdown::new();
        stuck.spawn(std::future::pending::<()>());
        assert!(!stuck.drain(Duration::from_millis(50)).await);
    }
}
