//! [`PythonStrategy`] and its rounds: the `Strategy` seam over a Python class.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyType};
use rondo_core::aggregate::{ModelBuffer, Update};
use rondo_core::model::{ModelMismatch, ModelSpec};
use rondo_core::strategy::{Finalized, RoundAggregation, RoundStart, Strategy};
use rondo_net::settings::ConfigError;

use super::convert::{self, one_line};
use super::interpreter;
use super::worker::{self, CallError, Worker};
use crate::config::PythonSettings;

/// Importing the module and instantiating the class may take longer than one round's call
/// (numpy's import alone is a good part of a second on a busy machine).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The Python aggregator `settings` names, loaded and instantiated. An error (the interpreter,
/// the venv, the import, the class, its options) is a config that cannot be used: the
/// aggregator stops at start-up with exit code 2 and this one line.
pub fn strategy(settings: &PythonSettings) -> anyhow::Result<Arc<dyn Strategy>> {
    let label = format!("{}.{}", settings.module, settings.class);
    let unusable =
        |why: String| ConfigError::unreadable(format!("aggregation.python ({label}): {why}"));
    let worker = worker::worker().map_err(unusable)?;
    let loading = settings.clone();
    let loaded = worker
        .call(settings.timeout.max(STARTUP_TIMEOUT), move |py| {
            load(py, &loading)
        })
        .map_err(|e| {
            unusable(match e {
                CallError::Failed(why) => why,
                _ => "importing and instantiating it took more than 60 s".into(),
            })
        })?;
    tracing::info!(
        rule = %label,
        holds_updates = loaded.holds_updates,
        timeout_secs = settings.timeout.as_secs_f64(),
        venv = loaded.venv.as_deref().unwrap_or("none"),
        "Python aggregator ready: {}",
        loaded.interpreter
    );
    Ok(Arc::new(PythonStrategy {
        rule: Arc::new(Rule {
            label,
            objects: Mutex::new(Some(Objects {
                instance: loaded.instance,
                update_class: loaded.update_class,
            })),
            active: Mutex::new(None),
            timeout: settings.timeout,
            worker,
        }),
        holds_updates: loaded.holds_updates,
    }))
}

struct Loaded {
    instance: Py<PyAny>,
    update_class: Py<PyAny>,
    holds_updates: bool,
    venv: Option<String>,
    interpreter: String,
}

/// Start-up, on the Python thread: packages, module, class, instance.
fn load(py: Python<'_>, settings: &PythonSettings) -> Result<Loaded, String> {
    let (module, class) = (&settings.module, &settings.class);
    let venv = match interpreter::chosen_venv(&settings.venv) {
        Some(venv) => Some(interpreter::add_venv(py, &venv)?),
        None => None,
    };
    let base = py
        .import("rondo_aggregators")
        .map_err(|e| {
            format!(
                "cannot import rondo_aggregators, which every Python aggregator builds on ({}); pip install python/aggregators into the venv",
                describe_exception(py, &e)
            )
        })?;
    let aggregator = base.getattr("Aggregator").map_err(|e| e.to_string())?;
    let update_class = base.getattr("Update").map_err(|e| e.to_string())?;
    let imported = py.import(module.as_str()).map_err(|e| {
        format!(
            "cannot import module {module}: {}",
            describe_exception(py, &e)
        )
    })?;
    let found = imported
        .getattr(class.as_str())
        .map_err(|_| format!("module {module} has no attribute {class}"))?;
    let is_subclass = found
        .cast::<PyType>()
        .ok()
        .and_then(|t| t.is_subclass(&aggregator).ok())
        .unwrap_or(false);
    if !is_subclass {
        return Err(format!(
            "{module}.{class} is not a subclass of rondo_aggregators.Aggregator"
        ));
    }
    let holds_updates = found
        .getattr("holds_updates")
        .and_then(|h| h.extract::<bool>())
        .map_err(|_| format!("{module}.{class}.holds_updates must be a bool"))?;
    let options = PyDict::new(py);
    for (name, value) in &settings.options {
        options.set_item(name, value).map_err(|e| e.to_string())?;
    }
    let instance = found.call((), Some(&options)).map_err(|e| {
        format!(
            "{module}.{class}(**{{{}}}) raised {}",
            settings
                .options
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            describe_exception(py, &e)
        )
    })?;
    Ok(Loaded {
        instance: instance.unbind(),
        update_class: update_class.unbind(),
        holds_updates,
        venv: venv.map(|v| v.display().to_string()),
        interpreter: interpreter::describe(py),
    })
}

/// `Type: message` of a Python exception, on one line.
fn describe_exception(py: Python<'_>, err: &PyErr) -> String {
    let kind = err
        .get_type(py)
        .qualname()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "exception".into());
    let message = err
        .value(py)
        .str()
        .map(|s| one_line(&s.to_string()))
        .unwrap_or_default();
    if message.is_empty() {
        kind
    } else {
        format!("{kind}: {message}")
    }
}

/// The Python traceback of `err`, for the debug log.
fn traceback(py: Python<'_>, err: &PyErr) -> String {
    py.import("traceback")
        .and_then(|tb| {
            tb.call_method1(
                "format_exception",
                (err.get_type(py), err.value(py), err.traceback(py)),
            )
        })
        .and_then(|lines| lines.extract::<Vec<String>>())
        .map(|lines| lines.concat())
        .unwrap_or_default()
}

/// A call of `method` raised: the reason, with the exception (the traceback goes to the debug
/// log now, while it exists; it is not kept, since its frames hold the round's arrays).
fn raised(py: Python<'_>, method: &str, err: PyErr) -> String {
    tracing::debug!(method, "Python traceback:\n{}", traceback(py, &err));
    format!("{method} raised {}", describe_exception(py, &err))
}

/// What all rounds of one Python rule share.
struct Rule {
    /// `module.class`, for messages.
    label: String,
    /// The rule's instance and `rondo_aggregators.Update`; only touched on the Python thread
    /// (the `Mutex` makes them `Sync`), and `None` once the strategy is dropped.
    objects: Mutex<Option<Objects>>,
    /// The round the instance is in (the last `start_round` that succeeded).
    active: Mutex<Option<u64>>,
    timeout: Duration,
    worker: &'static Worker,
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rule")
            .field("label", &self.label)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

struct Objects {
    instance: Py<PyAny>,
    update_class: Py<PyAny>,
}

impl Rule {
    /// New references to the rule's Python objects, on the Python thread.
    fn objects(&self, py: Python<'_>) -> Result<(Py<PyAny>, Py<PyAny>), String> {
        self.objects
            .lock()
            .as_ref()
            .map(|o| (o.instance.clone_ref(py), o.update_class.clone_ref(py)))
            .ok_or_else(|| "the aggregator is shutting down".into())
    }
}

/// Rounds are told apart by a number of their own: a round is retried under the same number.
static NEXT_ROUND_KEY: AtomicU64 = AtomicU64::new(1);

/// A Python class as the aggregation [`Strategy`].
#[derive(Debug)]
pub struct PythonStrategy {
    rule: Arc<Rule>,
    holds_updates: bool,
}

impl Strategy for PythonStrategy {
    fn name(&self) -> &'static str {
        "python"
    }

    fn begin_round(&self, start: RoundStart) -> Box<dyn RoundAggregation> {
        Box::new(PythonRound {
            rule: self.rule.clone(),
            key: NEXT_ROUND_KEY.fetch_add(1, Ordering::Relaxed),
            round: start.round,
            spec: start.spec,
            prefix: start.prefix,
            previous: start.previous,
            spare: start.spare,
            started: AtomicBool::new(false),
            failure: Arc::default(),
            updates: AtomicUsize::new(0),
        })
    }

    fn holds_updates(&self) -> bool {
        self.holds_updates
    }
}

impl Drop for PythonStrategy {
    fn drop(&mut self) {
        // The instance is freed where Python runs, not on whichever thread drops the last
        // reference.
        if let Some(objects) = self.rule.objects.lock().take() {
            self.rule.worker.spawn(move |_py| drop(objects));
        }
    }
}

/// One round of a Python rule. `start_round` runs with the round's first update (a round
/// that gets none never reaches Python); the first failure is kept, every later call of the
/// round is skipped, and `finalize` returns it.
pub struct PythonRound {
    rule: Arc<Rule>,
    key: u64,
    round: u32,
    spec: ModelSpec,
    prefix: usize,
    previous: Option<Bytes>,
    /// Memory of an earlier model, for the next one's file.
    spare: Option<Vec<u64>>,
    started: AtomicBool,
    /// Shared with the round's calls, which skip Python once the round has failed.
    failure: Arc<Mutex<Option<String>>>,
    updates: AtomicUsize,
}

impl fmt::Debug for PythonRound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PythonRound")
            .field("rule", &self.rule.label)
            .field("round", &self.round)
            .field("updates", &self.updates.load(Ordering::Relaxed))
            .field("failure", &*self.failure.lock())
            .finish_non_exhaustive()
    }
}

/// Why a call of round `key` must not run: the instance is in another round (one that
/// started since, or none after a failed start).
fn not_in_round(rule: &Rule, key: u64) -> Option<&'static str> {
    (*rule.active.lock() != Some(key))
        .then_some("the Python aggregator is no longer in this round (another one started, or its start failed)")
}

impl PythonRound {
    fn failed(&self) -> bool {
        self.failure.lock().is_some()
    }

    /// Records why the round fails (the first reason wins) and logs it.
    fn fail(&self, reason: String) {
        let mut failure = self.failure.lock();
        if failure.is_none() {
            tracing::warn!(round = self.round, rule = %self.rule.label, %reason, "Python aggregator failed; the round will fail");
            *failure = Some(reason);
        }
    }

    /// Runs `f` on the Python thread as call `method` of this round, with the rule's timeout.
    fn call<T: Send + 'static>(
        &self,
        method: &'static str,
        f: impl for<'py> FnOnce(Python<'py>) -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let rule = &self.rule;
        let started = std::time::Instant::now();
        let result = rule.worker.call(rule.timeout, f);
        tracing::debug!(
            round = self.round,
            method,
            ms = started.elapsed().as_secs_f64() * 1e3,
            ok = result.is_ok(),
            "Python call"
        );
        result.map_err(|e| {
            let why = match e {
                CallError::Failed(why) => why,
                CallError::TimedOut { interrupted } => format!(
                    "{method} ran past aggregation.python.timeout_secs ({} s){}",
                    rule.timeout.as_secs_f64(),
                    if interrupted { " and was interrupted" } else { "" }
                ),
                CallError::Stuck => format!(
                    "{method} could not start: the Python thread is still held by an earlier call past aggregation.python.timeout_secs ({} s)",
                    rule.timeout.as_secs_f64()
                ),
            };
            format!("Python aggregator {}: {why}", rule.label)
        })
    }

    /// Calls `start_round` unless the round is already in it.
    fn ensure_started(&self) -> Result<(), String> {
        if self.started.load(Ordering::Acquire) {
            return Ok(());
        }
        let rule = self.rule.clone();
        let (key, round, spec, previous) = (
            self.key,
            self.round,
            self.spec.clone(),
            self.previous.clone(),
        );
        let failure = self.failure.clone();
        self.call("start_round", move |py| {
            // Started by an earlier update's call, or failed (then never started again: the
            // round's verdict is in).
            if *rule.active.lock() == Some(key) || failure.lock().is_some() {
                return Ok(());
            }
            let (instance, _) = rule.objects(py)?;
            let global = match previous {
                Some(bytes) => Some(
                    convert::views(py, &spec, bytes)
                        .map_err(|e| format!("the global model cannot be handed over: {e}"))?,
                ),
                None => None,
            };
            // A failed start leaves the instance in no round, so that no call of an older
            // round runs on whatever state it is in now.
            *rule.active.lock() = None;
            instance
                .call_method1(py, "start_round", (round, global))
                .map_err(|e| raised(py, "start_round", e))?;
            *rule.active.lock() = Some(key);
            Ok(())
        })?;
        self.started.store(true, Ordering::Release);
        Ok(())
    }
}

impl RoundAggregation for PythonRound {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The update counts as part of the round even when Python refuses it: it was accepted,
    /// and the round fails at finalize with the reason.
    fn add(&self, update: Update) -> Result<(), ModelMismatch> {
        self.spec.check_update(&update.spec)?;
        self.updates.fetch_add(1, Ordering::Relaxed);
        if self.failed() {
            return Ok(());
        }
        if let Err(reason) = self.ensure_started() {
            self.fail(reason);
            return Ok(());
        }
        let rule = self.rule.clone();
        let key = self.key;
        let failure = self.failure.clone();
        let added = self.call("add_update", move |py| {
            // Failed while this call waited its turn (an earlier update of the round): the
            // round's verdict is in, Python need not see the update.
            if failure.lock().is_some() {
                return Ok(());
            }
            if let Some(reason) = not_in_round(&rule, key) {
                return Err(reason.into());
            }
            let Update {
                key: participant_id,
                spec,
                data,
                weight,
                metrics,
            } = update;
            let weights = convert::views(py, &spec, data)?;
            let metrics_dict = PyDict::new(py);
            for (name, value) in &metrics {
                metrics_dict
                    .set_item(name, value)
                    .map_err(|e| e.to_string())?;
            }
            // `weight` is the update's n_samples (an integer of at most 2^53).
            let n_samples = weight as u64;
            let (instance, update_class) = rule.objects(py)?;
            let py_update = update_class
                .call1(py, (participant_id, weights, n_samples, metrics_dict))
                .map_err(|e| format!("making its Update failed: {e}"))?;
            instance
                .call_method1(py, "add_update", (py_update,))
                .map_err(|e| raised(py, "add_update", e))?;
            Ok(())
        });
        if let Err(reason) = added {
            self.fail(reason);
        }
        Ok(())
    }

    fn updates(&self) -> usize {
        self.updates.load(Ordering::Relaxed)
    }

    fn finalize(mut self: Box<Self>, _previous: Option<&[u8]>) -> Result<Finalized, String> {
        if let Some(reason) = self.failure.lock().clone() {
            return Err(reason);
        }
        self.ensure_started()?;
        let rule = self.rule.clone();
        let (key, spec, prefix, spare) =
            (self.key, self.spec.clone(), self.prefix, self.spare.take());
        let model: ModelBuffer = self
            .call("finish_round", move |py| {
                if let Some(reason) = not_in_round(&rule, key) {
                    return Err(reason.into());
                }
                let (instance, _) = rule.objects(py)?;
                // The round is over for the instance, whatever comes of it.
                *rule.active.lock() = None;
                let started = std::time::Instant::now();
                let buffer = ModelBuffer::reusing(prefix, spec.byte_len(), spare);
                let (next, next_views) = convert::next_model(py, &spec, buffer)?;
                let instance = instance.bind(py);
                // A rule may write its result into these and return them, sparing a copy; a
                // class that refuses the attribute (__slots__) just does not see them.
                let offered = instance.setattr("next_model", &next_views).is_ok();
                drop(next_views);
                let result = instance.call_method0("finish_round");
                if offered {
                    let _ = instance.setattr("next_model", py.None());
                }
                let result = result.map_err(|e| raised(py, "finish_round", e))?;
                let called = started.elapsed();
                let model = convert::model_from_result(py, result, &spec, next)
                    .map_err(|e| format!("finish_round {e}"));
                tracing::debug!(
                    python_ms = called.as_secs_f64() * 1e3,
                    check_and_copy_ms = (started.elapsed() - called).as_secs_f64() * 1e3,
                    "finish_round"
                );
                model
            })
            .inspect_err(|reason| self.fail(reason.clone()))?;
        Ok(Finalized {
            model,
            checked_finite: true,
        })
    }
}
