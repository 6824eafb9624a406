//! The one OS thread that Python runs on.
//!
//! Python code never runs on tokio's threads nor on the blocking threads that fold uploads:
//! they send a closure here ([`Worker::call`]) and wait for its result, at most the call's
//! timeout *from the moment it starts running* (calls queue behind each other, one at a time,
//! and a call waiting its turn is not late). This thread holds the GIL only while it runs a
//! call; it waits for the next one detached.
//!
//! A call past its timeout is abandoned by its caller, who then interrupts it: the thread gets
//! SIGUSR2, whose Python handler raises [`CallTimedOut`] (a `BaseException`, so an `except
//! Exception` in the rule does not swallow it) if, and only if, that call is still the one
//! running. The signal also wakes a blocking system call such as `time.sleep`. A call stuck
//! in C code that checks no signals cannot be interrupted; the calls queued behind it give up
//! once it has run past its timeout by [`STUCK_GRACE`], so no caller waits for ever.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use pyo3::prelude::*;

pyo3::create_exception!(
    rondo_aggregator,
    CallTimedOut,
    pyo3::exceptions::PyBaseException,
    "Raised inside a Python aggregator call that ran past aggregation.python.timeout_secs."
);

/// The signal that interrupts a call past its timeout. Nothing else in the aggregator uses it;
/// one sent from outside is ignored unless a call is being interrupted.
const INTERRUPT_SIGNAL: i32 = libc::SIGUSR2;

/// How long past its timeout a running call may keep the thread before the calls queued
/// behind it stop waiting (the interrupt normally takes effect within milliseconds).
pub(super) const STUCK_GRACE: Duration = Duration::from_secs(1);

type Job = Box<dyn for<'py> FnOnce(Python<'py>) + Send>;

pub(super) struct Worker {
    queue: Mutex<VecDeque<Job>>,
    queued: Condvar,
    running: Mutex<Running>,
    /// The thread's pthread id, for the interrupt signal.
    thread: OnceLock<libc::pthread_t>,
    /// Whether the interrupt handler is installed (else a call past its timeout is abandoned,
    /// not interrupted).
    interruptible: AtomicBool,
    next_call: AtomicU64,
}

/// The call the thread is running, and the one an interrupt was asked for.
#[derive(Default)]
struct Running {
    current: Option<(u64, Instant)>,
    interrupt: Option<u64>,
}

static WORKER: OnceLock<Result<&'static Worker, String>> = OnceLock::new();

/// The Python thread, started (and the interpreter initialized on it) by the first call.
pub(super) fn worker() -> Result<&'static Worker, String> {
    WORKER.get_or_init(Worker::start).clone()
}

impl Worker {
    fn start() -> Result<&'static Worker, String> {
        // Lives as long as the process: Python cannot be initialized twice.
        let worker: &'static Worker = Box::leak(Box::new(Worker {
            queue: Mutex::new(VecDeque::new()),
            queued: Condvar::new(),
            running: Mutex::new(Running::default()),
            thread: OnceLock::new(),
            interruptible: AtomicBool::new(false),
            next_call: AtomicU64::new(1),
        }));
        let (ready, started) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("rondo-python".into())
            .spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                let _ = worker.thread.set(unsafe { libc::pthread_self() });
                // Initialized on this thread, which makes it Python's main thread: the one
                // Python runs signal handlers on.
                match super::interpreter::initialize() {
                    Ok(()) => worker.serve(|| {
                        let _ = ready.send(Ok(()));
                    }),
                    Err(err) => {
                        let _ = ready.send(Err(err));
                    }
                }
            })
            .map_err(|e| format!("starting the Python thread failed: {e}"))?;
        started
            .recv()
            .map_err(|_| "the Python thread ended while starting".to_string())??;
        Ok(worker)
    }

    /// Installs the interrupt handler, says it is `ready`, then runs calls for ever.
    fn serve(&'static self, ready: impl FnOnce()) {
        Python::attach(|py| {
            match install_interrupt_handler(py) {
                Ok(()) => self.interruptible.store(true, Ordering::Release),
                Err(err) => tracing::warn!(
                    error = %err,
                    "Python calls past aggregation.python.timeout_secs cannot be interrupted, only abandoned"
                ),
            }
            ready();
            loop {
                let job = py.detach(|| {
                    let mut queue = self.queue.lock();
                    loop {
                        if let Some(job) = queue.pop_front() {
                            return job;
                        }
                        self.queued.wait(&mut queue);
                    }
                });
                job(py);
            }
        })
    }

    fn push(&self, job: Job) {
        self.queue.lock().push_back(job);
        self.queued.notify_one();
    }

    /// Runs `f` on the Python thread without waiting for it (e.g. to drop Python objects there).
    pub(super) fn spawn(&'static self, f: impl for<'py> FnOnce(Python<'py>) + Send + 'static) {
        self.push(Box::new(move |py| {
            // A panic must not end the thread every later call needs.
            let _ = catch_unwind(AssertUnwindSafe(|| f(py)));
        }));
    }

    /// Runs `f` on the Python thread and waits for its result, at most `timeout` once it has
    /// started (see the module's documentation).
    pub(super) fn call<T: Send + 'static>(
        &'static self,
        timeout: Duration,
        f: impl for<'py> FnOnce(Python<'py>) -> Result<T, String> + Send + 'static,
    ) -> Result<T, CallError> {
        let call = Arc::new(Call {
            id: self.next_call.fetch_add(1, Ordering::Relaxed),
            state: Mutex::new(CallState::Queued),
            changed: Condvar::new(),
        });
        let job_call = call.clone();
        self.push(Box::new(move |py| {
            if !job_call.begin() {
                return;
            }
            self.running.lock().current = Some((job_call.id, Instant::now()));
            let outcome = catch_unwind(AssertUnwindSafe(|| f(py)))
                .unwrap_or_else(|_| Err("the call panicked".to_string()));
            *self.running.lock() = Running::default();
            job_call.finish(outcome);
        }));
        self.wait(&call, timeout)
    }

    fn wait<T>(&self, call: &Call<T>, timeout: Duration) -> Result<T, CallError> {
        let mut state = call.state.lock();
        // Since when the thread has been seen between calls while this one was still queued
        // (normally a moment: it is about to start).
        let mut idle_since: Option<Instant> = None;
        loop {
            let now = Instant::now();
            match &*state {
                CallState::Done(_) => {
                    let CallState::Done(outcome) =
                        std::mem::replace(&mut *state, CallState::Abandoned)
                    else {
                        unreachable!("matched Done above");
                    };
                    return outcome.map_err(CallError::Failed);
                }
                CallState::Running(since) => {
                    let deadline = *since + timeout;
                    if now >= deadline {
                        *state = CallState::Abandoned;
                        drop(state);
                        let interrupted = self.interrupt(call.id);
                        return Err(CallError::TimedOut { interrupted });
                    }
                    call.changed.wait_until(&mut state, deadline);
                }
                CallState::Queued => {
                    let busy = self.running.lock().current;
                    let idle = *idle_since.get_or_insert(now);
                    match busy {
                        Some((_, since)) if now >= since + timeout + STUCK_GRACE => {
                            *state = CallState::Abandoned;
                            return Err(CallError::Stuck);
                        }
                        Some((_, since)) => {
                            idle_since = None;
                            call.changed
                                .wait_until(&mut state, since + timeout + STUCK_GRACE);
                        }
                        // Between two calls for longer than any call may take: the thread
                        // is not taking calls any more.
                        None if now >= idle + timeout + STUCK_GRACE => {
                            *state = CallState::Abandoned;
                            return Err(CallError::Stuck);
                        }
                        None => {
                            call.changed.wait_for(&mut state, Duration::from_millis(10));
                        }
                    }
                }
                CallState::Abandoned => unreachable!("only the caller abandons its call"),
            }
        }
    }

    /// Interrupts call `id` if it is still running; returns whether a signal was sent.
    fn interrupt(&self, id: u64) -> bool {
        let mut running = self.running.lock();
        let still_running = running.current.is_some_and(|(current, _)| current == id);
        let Some(&thread) = self.thread.get() else {
            return false;
        };
        if !still_running || !self.interruptible.load(Ordering::Acquire) {
            return false;
        }
        running.interrupt = Some(id);
        // SAFETY: the thread lives as long as the process (it never returns from `serve`),
        // and Python's handler for this signal is installed (`interruptible`).
        unsafe { libc::pthread_kill(thread, INTERRUPT_SIGNAL) == 0 }
    }

    /// Whether the running call is the one an interrupt was asked for.
    fn interrupt_pending(&self) -> bool {
        let running = self.running.lock();
        running.interrupt.is_some() && running.interrupt == running.current.map(|(id, _)| id)
    }
}

/// Why a call gave no result.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum CallError {
    /// The call itself said why (a Python exception, a wrong result).
    Failed(String),
    /// It ran past its timeout; `interrupted` says whether the thread was signalled.
    TimedOut { interrupted: bool },
    /// It never started: the thread is still held by an earlier call past its timeout.
    Stuck,
}

struct Call<T> {
    id: u64,
    state: Mutex<CallState<T>>,
    changed: Condvar,
}

enum CallState<T> {
    Queued,
    Running(Instant),
    Done(Result<T, String>),
    /// The caller stopped waiting: the call is skipped if it has not started, and its result
    /// is dropped if it has.
    Abandoned,
}

impl<T> Call<T> {
    /// Marks the call running; `false` when its caller has given up on it.
    fn begin(&self) -> bool {
        let mut state = self.state.lock();
        if matches!(*state, CallState::Abandoned) {
            return false;
        }
        *state = CallState::Running(Instant::now());
        self.changed.notify_all();
        true
    }

    fn finish(&self, outcome: Result<T, String>) {
        let mut state = self.state.lock();
        if matches!(*state, CallState::Running(_)) {
            *state = CallState::Done(outcome);
            self.changed.notify_all();
        }
    }
}

/// The Python side of the interrupt: raises only inside the call it was meant for, so that a
/// signal that lands just after that call returned does not hit the next one.
#[pyfunction]
fn on_interrupt_signal(_signum: i32, _frame: Bound<'_, PyAny>) -> PyResult<()> {
    match WORKER.get() {
        Some(Ok(worker)) if worker.interrupt_pending() => Err(CallTimedOut::new_err(
            "the call ran past aggregation.python.timeout_secs",
        )),
        _ => Ok(()),
    }
}

fn install_interrupt_handler(py: Python<'_>) -> PyResult<()> {
    let handler = wrap_pyfunction!(on_interrupt_signal, py)?;
    py.import("signal")?
        .call_method1("signal", (INTERRUPT_SIGNAL, handler))?;
    Ok(())
}

#[cfg(test)]
pub(super) fn interruptible() -> bool {
    worker().is_ok_and(|w| w.interruptible.load(Ordering::Acquire))
}
