//! The Python strategy against the real embedded interpreter, with the repo's `.venv` (which
//! `scripts/setup` makes, with `rondo_aggregators` installed). Test rules are modules defined
//! from source below.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::PyModule;
use rondo_core::aggregate::Update;
use rondo_core::kernels::{decode_values, encode_values};
use rondo_core::model::{DType, ModelSpec, TensorSpec};
use rondo_core::strategy::{FedAvg, RoundStart, Strategy};

use super::worker::{self, interruptible};
use crate::config::PythonSettings;

const VENV: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv");

/// One Python thread serves the whole process: a test that holds it up (or interrupts it)
/// must not make another one's calls late.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const PROBES: &str = r#"
import json
import signal
import time

import numpy as np

from rondo_aggregators import Aggregator
from rondo_aggregators.weighted_average import WeightedAverage

SEEN = []


def describe(weights):
    out = {}
    for name, w in weights.items():
        try:
            w.flat[0] = 0
            wrote = True
        except ValueError:
            wrote = False
        try:
            w.flags.writeable = True
            made_writeable = True
        except ValueError:
            made_writeable = False
        out[name] = {
            "dtype": w.dtype.name,
            "shape": list(w.shape),
            "writeable": bool(w.flags.writeable),
            "wrote": wrote,
            "made_writeable": made_writeable,
            "address": w.__array_interface__["data"][0],
            "values": [float(x) for x in w.astype(np.float64).ravel()],
        }
    return out


class Probe(Aggregator):
    """Records what it is handed; its next model is the global model it started from."""

    holds_updates = False

    def start_round(self, round, global_model):
        SEEN.append({"call": "start", "round": round, "weights": describe(global_model)})
        self.model = {name: np.array(w) for name, w in global_model.items()}

    def add_update(self, update):
        SEEN.append({
            "call": "add",
            "participant_id": update.participant_id,
            "n_samples": update.n_samples,
            "metrics": dict(update.metrics),
            "weights": describe(update.weights),
        })

    def finish_round(self):
        return self.model


def seen():
    return json.dumps(SEEN)


class Flaky(WeightedAverage):
    """A weighted average that fails as `mode` says while `failing` (a module global) is true."""

    mode = ""

    def __init__(self, mode=0.0):
        super().__init__()
        self.how = {1: "raise_in_add", 2: "busy", 3: "stuck", 4: "keep"}.get(int(mode), "")
        self.kept = []

    def add_update(self, update):
        if FAILING and self.how == "raise_in_add":
            local_reference_to_the_update = update  # noqa: F841 - held by the traceback's frame
            raise RuntimeError("refused " + update.participant_id)
        if FAILING and self.how == "stuck":
            # Masked, the interrupt signal stays pending: an uninterruptible call.
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
            try:
                time.sleep(STUCK_SECS)
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR2])
        super().add_update(update)

    def finish_round(self):
        if FAILING and self.how == "busy":
            while True:
                pass
        return super().finish_round()


class Writer(Aggregator):
    """Writes its model (how = "same": the global model plus one; "swap": the two tensors of a
    two-tensor model exchanged) into `next_model`, and may keep it."""

    holds_updates = False

    def __init__(self, how=0.0, keep=0.0):
        super().__init__()
        self.how, self.keep = int(how), bool(keep)

    def start_round(self, round, global_model):
        self.model = {name: np.array(w) for name, w in global_model.items()}

    def add_update(self, update):
        pass

    def finish_round(self):
        out = self.next_model
        SEEN.append({name: a.__array_interface__["data"][0] for name, a in out.items()})
        if self.keep:
            self.kept = out
        if self.how == 1:
            a, b = sorted(out)
            out[b][...] = self.model[a]
            out[a][...] = self.model[b]
            return {a: out[b], b: out[a]}
        for name, w in self.model.items():
            out[name][...] = w + 1
        return out


FAILING = False
STUCK_SECS = 0.0
"#;

fn on_python<T: Send + 'static>(
    f: impl for<'py> FnOnce(Python<'py>) -> PyResult<T> + Send + 'static,
) -> T {
    worker::worker()
        .expect("the Python thread starts")
        .call(Duration::from_secs(60), move |py| {
            f(py).map_err(|e| e.to_string())
        })
        .expect("the helper call succeeds")
}

/// The probes module, defined once; `code` run in it (e.g. to set `FAILING`).
fn probes(code: &'static str) {
    on_python(move |py| {
        let sys = py.import("sys")?;
        let module = match sys.getattr("modules")?.get_item("rondo_test_probes") {
            Ok(module) => module,
            Err(_) => {
                // The venv (for numpy and rondo_aggregators) before the module's imports.
                super::interpreter::add_venv(py, std::path::Path::new(VENV))
                    .map_err(pyo3::exceptions::PyRuntimeError::new_err)?;
                let source = CString::new(PROBES).expect("no NUL in the source");
                PyModule::from_code(py, &source, c"rondo_test_probes.py", c"rondo_test_probes")?
                    .into_any()
            }
        };
        let source = CString::new(code).expect("no NUL in the code");
        py.run(
            &source,
            Some(&module.getattr("__dict__")?.cast_into()?),
            None,
        )
    });
}

fn seen() -> serde_json::Value {
    let text = on_python(|py| {
        py.import("rondo_test_probes")?
            .call_method0("seen")?
            .extract::<String>()
    });
    serde_json::from_str(&text).expect("JSON")
}

fn rule(
    module: &str,
    class: &str,
    options: &[(&str, f64)],
    timeout: Duration,
) -> Arc<dyn Strategy> {
    probes("");
    super::strategy(&PythonSettings {
        module: module.into(),
        class: class.into(),
        timeout,
        venv: VENV.into(),
        options: options.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    })
    .expect("the rule loads")
}

fn tensor(name: &str, dtype: DType, shape: &[usize]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
    }
}

/// A model of every dtype, the 3-element f16 tensor first so that the others start at offsets
/// that are not multiples of their size.
fn mixed_spec() -> ModelSpec {
    ModelSpec {
        tensors: vec![
            tensor("half", DType::F16, &[3]),
            tensor("single", DType::F32, &[2, 2]),
            tensor("double", DType::F64, &[3]),
            tensor("brain", DType::BF16, &[2]),
            tensor("scalar", DType::F32, &[]),
        ],
    }
}

/// Bytes that count their drops, so a test can see every view of them is gone.
struct Tracked {
    bytes: Vec<u8>,
    drops: Arc<AtomicUsize>,
}

impl AsRef<[u8]> for Tracked {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

/// `spec`'s tensors, each filled from `value(tensor index, element index)`.
fn model_bytes(spec: &ModelSpec, value: impl Fn(usize, usize) -> f64) -> Vec<u8> {
    spec.tensors
        .iter()
        .enumerate()
        .flat_map(|(t, tensor)| {
            let values: Vec<f64> = (0..tensor.element_count()).map(|i| value(t, i)).collect();
            encode_values(tensor.dtype, &values)
        })
        .collect()
}

fn tracked(bytes: Vec<u8>, drops: &Arc<AtomicUsize>) -> Bytes {
    Bytes::from_owner(Tracked {
        bytes,
        drops: drops.clone(),
    })
}

fn update(spec: &ModelSpec, key: &str, data: Bytes, weight: f64) -> Update {
    Update {
        key: key.into(),
        spec: spec.clone(),
        data,
        weight,
        metrics: BTreeMap::from([("loss".to_string(), 0.25)]),
    }
}

fn start(round: u32, spec: &ModelSpec, previous: Bytes) -> RoundStart {
    RoundStart {
        prefix: 16,
        previous: Some(previous),
        ..RoundStart::bare(round, spec.clone())
    }
}

#[test]
fn updates_arrive_as_read_only_views_of_the_aggregators_own_bytes_and_are_let_go() {
    let _one = ONE_AT_A_TIME.lock();
    let strategy = rule("rondo_test_probes", "Probe", &[], Duration::from_secs(10));
    assert_eq!(strategy.name(), "python");
    assert!(!strategy.holds_updates(), "Probe.holds_updates = False");
    probes("SEEN.clear()");
    let spec = mixed_spec();
    let drops = Arc::new(AtomicUsize::new(0));
    let global = model_bytes(&spec, |t, i| (t * 10 + i) as f64);
    let round = strategy.begin_round(start(7, &spec, tracked(global.clone(), &drops)));

    // The update lays its tensors out in another order than the model: views follow its own.
    let reversed = ModelSpec {
        tensors: spec.tensors.iter().rev().cloned().collect(),
    };
    let data = tracked(
        model_bytes(&reversed, |t, i| -((t * 10 + i) as f64)),
        &drops,
    );
    let address = data.as_ptr() as u64;
    round
        .add(update(&reversed, "alice", data, 12.0))
        .expect("the update fits");
    assert_eq!(round.updates(), 1);

    let seen = seen();
    let (started, added) = (&seen[0], &seen[1]);
    assert_eq!(started["call"], "start");
    assert_eq!(started["round"], 7);
    assert_eq!(added["participant_id"], "alice");
    assert_eq!(added["n_samples"], 12);
    assert_eq!(added["metrics"]["loss"], 0.25);
    let mut offset = 0;
    for (t, tensor) in reversed.tensors.iter().enumerate() {
        let view = &added["weights"][&tensor.name];
        let dtype = match tensor.dtype {
            DType::F16 => "float16",
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::BF16 => "bfloat16",
        };
        assert_eq!(view["dtype"], dtype, "{}", tensor.name);
        assert_eq!(view["shape"], serde_json::json!(tensor.shape));
        assert_eq!(view["writeable"], false);
        assert_eq!(view["wrote"], false, "{}: a write is refused", tensor.name);
        assert_eq!(view["made_writeable"], false, "{}", tensor.name);
        assert_eq!(
            view["address"].as_u64(),
            Some(address + offset as u64),
            "{}: a view of the update's bytes, not a copy",
            tensor.name
        );
        let want: Vec<f64> = (0..tensor.element_count())
            .map(|i| -((t * 10 + i) as f64))
            .collect();
        assert_eq!(view["values"], serde_json::json!(want), "{}", tensor.name);
        offset += tensor.byte_len();
    }
    for (t, tensor) in spec.tensors.iter().enumerate() {
        let want: Vec<f64> = (0..tensor.element_count())
            .map(|i| (t * 10 + i) as f64)
            .collect();
        assert_eq!(
            started["weights"][&tensor.name]["values"],
            serde_json::json!(want)
        );
    }
    assert_eq!(
        drops.load(Ordering::SeqCst),
        1,
        "the update's bytes are released once add_update returns (holds_updates = False)"
    );

    let finalized = round.finalize(None).expect("the round aggregates");
    assert!(finalized.checked_finite);
    assert_eq!(
        finalized.model.data(),
        &global[..],
        "Probe returns the global model"
    );
    assert_eq!(finalized.model.as_ref().len(), 16 + global.len());
    assert_eq!(
        drops.load(Ordering::SeqCst),
        2,
        "nothing of the round is referenced any more"
    );
}

#[test]
fn the_python_weighted_average_is_native_fedavg_in_every_dtype() {
    let _one = ONE_AT_A_TIME.lock();
    let strategy = rule(
        "rondo_aggregators.weighted_average",
        "WeightedAverage",
        &[],
        Duration::from_secs(10),
    );
    let spec = mixed_spec();
    let native = FedAvg::default();
    let global = Bytes::from(model_bytes(&spec, |_, _| 0.0));
    let updates: Vec<(Vec<u8>, f64)> = (0..5)
        .map(|p| {
            let data = model_bytes(&spec, |t, i| ((p * 7 + t * 3 + i) % 11) as f64 * 0.37 - 1.5);
            (data, (p + 1) as f64 * 10.0)
        })
        .collect();
    let mut models = Vec::new();
    for strategy in [strategy.as_ref(), &native as &dyn Strategy] {
        let round = strategy.begin_round(start(1, &spec, global.clone()));
        for (p, (data, weight)) in updates.iter().enumerate() {
            round
                .add(update(
                    &spec,
                    &format!("p{p}"),
                    Bytes::from(data.clone()),
                    *weight,
                ))
                .expect("fits");
        }
        models.push(round.finalize(None).expect("aggregates").model);
    }
    let mut offset = 0;
    for tensor in &spec.tensors {
        let range = offset..offset + tensor.byte_len();
        let python = decode_values(tensor.dtype, &models[0].data()[range.clone()]);
        let native = decode_values(tensor.dtype, &models[1].data()[range]);
        // Native sums in f32, Python in f64; both round once into the dtype.
        let tolerance = match tensor.dtype {
            DType::F32 | DType::F64 => 1e-6,
            DType::F16 => 1e-3,
            DType::BF16 => 8e-3,
        };
        for (p, n) in python.iter().zip(&native) {
            assert!(
                (p - n).abs() <= tolerance * n.abs().max(1.0),
                "{}: python {p}, native {n}",
                tensor.name
            );
        }
        offset += tensor.byte_len();
    }
}

fn f32_spec() -> ModelSpec {
    ModelSpec {
        tensors: vec![tensor("w", DType::F32, &[4])],
    }
}

fn f32_update(key: &str, value: f64, drops: &Arc<AtomicUsize>) -> Update {
    update(
        &f32_spec(),
        key,
        tracked(encode_values(DType::F32, &[value; 4]), drops),
        1.0,
    )
}

/// Runs a round of two updates (`a`, `b`) on the zero model.
fn two_updates(strategy: &dyn Strategy, round: u32, a: f64, b: f64) -> Result<Vec<f64>, String> {
    let drops = Arc::new(AtomicUsize::new(0));
    let zeros = tracked(encode_values(DType::F32, &[0.0; 4]), &drops);
    let aggregation = strategy.begin_round(start(round, &f32_spec(), zeros));
    aggregation.add(f32_update("a", a, &drops)).expect("fits");
    aggregation.add(f32_update("b", b, &drops)).expect("fits");
    let result = aggregation
        .finalize(None)
        .map(|f| decode_values(DType::F32, f.model.data()));
    // Every reference to the round's bytes is gone, failed or not (no traceback, no view
    // kept by the instance past the round).
    assert_eq!(drops.load(Ordering::SeqCst), 3, "round {round}: {result:?}");
    result
}

#[test]
fn an_exception_in_add_update_fails_that_round_only() {
    let _one = ONE_AT_A_TIME.lock();
    let strategy = rule(
        "rondo_test_probes",
        "Flaky",
        &[("mode", 1.0)],
        Duration::from_secs(10),
    );
    probes("FAILING = True");
    let reason = two_updates(strategy.as_ref(), 1, 1.0, 3.0).expect_err("round 1 fails");
    assert_eq!(
        reason,
        "Python aggregator rondo_test_probes.Flaky: add_update raised RuntimeError: refused a"
    );
    probes("FAILING = False");
    assert_eq!(
        two_updates(strategy.as_ref(), 2, 1.0, 3.0),
        Ok(vec![2.0; 4])
    );
}

#[test]
fn a_call_past_the_timeout_is_interrupted_and_the_thread_is_free_again() {
    let _one = ONE_AT_A_TIME.lock();
    assert!(interruptible(), "the interrupt handler is installed");
    let timeout = Duration::from_millis(300);
    let strategy = rule("rondo_test_probes", "Flaky", &[("mode", 2.0)], timeout);
    probes("FAILING = True");
    let started = Instant::now();
    let reason = two_updates(strategy.as_ref(), 1, 1.0, 3.0).expect_err("round 1 fails");
    assert_eq!(
        reason,
        "Python aggregator rondo_test_probes.Flaky: finish_round ran past aggregation.python.timeout_secs (0.3 s) and was interrupted"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    probes("FAILING = False");
    let started = Instant::now();
    assert_eq!(
        two_updates(strategy.as_ref(), 2, 1.0, 3.0),
        Ok(vec![2.0; 4])
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no call of the old round is left"
    );
}

#[test]
fn a_call_that_cannot_be_interrupted_fails_rounds_but_no_caller_waits_for_ever() {
    let _one = ONE_AT_A_TIME.lock();
    let timeout = Duration::from_millis(300);
    let strategy = rule("rondo_test_probes", "Flaky", &[("mode", 3.0)], timeout);
    probes("FAILING = True\nSTUCK_SECS = 3.0");
    let started = Instant::now();
    let spec = f32_spec();
    let drops = Arc::new(AtomicUsize::new(0));
    let zeros = || tracked(encode_values(DType::F32, &[0.0; 4]), &drops);
    let first = strategy.begin_round(start(1, &spec, zeros()));
    first.add(f32_update("a", 1.0, &drops)).expect("fits");
    let reason = first.finalize(None).expect_err("round 1 fails");
    assert!(
        reason.ends_with(
            "add_update ran past aggregation.python.timeout_secs (0.3 s) and was interrupted"
        ),
        "{reason}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );

    // The thread is still asleep with the signal masked: the next round's first call gives
    // up once that call is past its timeout by the grace period, not when it ends.
    let second = strategy.begin_round(start(2, &spec, zeros()));
    second.add(f32_update("a", 1.0, &drops)).expect("fits");
    let reason = second.finalize(None).expect_err("round 2 fails too");
    assert!(
        reason.ends_with("start_round could not start: the Python thread is still held by an earlier call past aggregation.python.timeout_secs (0.3 s)"),
        "{reason}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= timeout + worker::STUCK_GRACE && waited < Duration::from_millis(2500),
        "{waited:?}"
    );

    // Once the sleep is over, the (pending) interrupt ends that call and the rule serves again.
    std::thread::sleep(Duration::from_secs(3).saturating_sub(started.elapsed()));
    probes("FAILING = False");
    assert_eq!(
        two_updates(strategy.as_ref(), 3, 1.0, 3.0),
        Ok(vec![2.0; 4])
    );
    assert_eq!(
        drops.load(Ordering::SeqCst),
        4,
        "every byte of the failed rounds let go"
    );
}

#[test]
fn a_rule_that_cannot_be_loaded_is_a_config_error() {
    let _one = ONE_AT_A_TIME.lock();
    probes("");
    for (module, class, options, want) in [
        (
            "rondo_test_nope",
            "X",
            vec![],
            "cannot import module rondo_test_nope: ModuleNotFoundError: No module named 'rondo_test_nope'",
        ),
        (
            "rondo_test_probes",
            "SEEN",
            vec![],
            "rondo_test_probes.SEEN is not a subclass of rondo_aggregators.Aggregator",
        ),
        (
            "rondo_aggregators.krum",
            "Krum",
            vec![("f", 0.5)],
            "rondo_aggregators.krum.Krum(**{f: 0.5}) raised ValueError: option f = 0.5 must be a whole number >= 0",
        ),
    ] {
        let err = super::strategy(&PythonSettings {
            module: module.into(),
            class: class.into(),
            timeout: Duration::from_secs(10),
            venv: VENV.into(),
            options: options
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        })
        .expect_err("refused");
        assert!(
            err.downcast_ref::<rondo_net::settings::ConfigError>()
                .is_some()
        );
        assert_eq!(
            err.to_string(),
            format!("invalid config: aggregation.python ({module}.{class}): {want}")
        );
    }
}

#[test]
fn a_model_written_into_next_model_is_published_without_a_copy_unless_the_rule_keeps_it() {
    let _one = ONE_AT_A_TIME.lock();
    let spec = mixed_spec();
    let global = model_bytes(&spec, |t, i| (t * 10 + i) as f64);
    let plus_one = model_bytes(&spec, |t, i| (t * 10 + i) as f64 + 1.0);
    for keep in [0.0, 1.0] {
        let strategy = rule(
            "rondo_test_probes",
            "Writer",
            &[("keep", keep)],
            Duration::from_secs(10),
        );
        probes("SEEN.clear()");
        let round = strategy.begin_round(start(1, &spec, Bytes::from(global.clone())));
        round
            .add(update(&spec, "a", Bytes::from(global.clone()), 1.0))
            .expect("fits");
        let model = round.finalize(None).expect("aggregates").model;
        assert_eq!(model.data(), &plus_one[..], "keep = {keep}");
        let seen = seen();
        let address = seen[0]["half"].as_u64().expect("an address");
        if keep == 0.0 {
            assert_eq!(
                address,
                model.data().as_ptr() as u64,
                "published where the rule wrote it"
            );
        } else {
            assert_ne!(address, model.data().as_ptr() as u64, "a copy");
            // What the rule writes into the views it kept goes nowhere.
            on_python(|py| {
                py.run(
                    c"import rondo_test_probes as p, gc
for o in gc.get_objects():
    if isinstance(o, p.Writer) and hasattr(o, 'kept'):
        for a in o.kept.values():
            a[...] = 0",
                    None,
                    None,
                )
            });
            assert_eq!(model.data(), &plus_one[..]);
        }
    }
}

#[test]
fn tensors_returned_from_each_others_place_in_next_model_land_right() {
    let _one = ONE_AT_A_TIME.lock();
    let spec = ModelSpec {
        tensors: vec![tensor("a", DType::F32, &[3]), tensor("b", DType::F32, &[3])],
    };
    let strategy = rule(
        "rondo_test_probes",
        "Writer",
        &[("how", 1.0)],
        Duration::from_secs(10),
    );
    let global = encode_values(DType::F32, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let round = strategy.begin_round(start(1, &spec, Bytes::from(global.clone())));
    round
        .add(update(&spec, "a", Bytes::from(global.clone()), 1.0))
        .expect("fits");
    let model = round.finalize(None).expect("aggregates").model;
    // The rule wrote b's values into a's place and a's into b's, and returned each from the
    // other's place: the result is what it returned, not what lies where.
    assert_eq!(
        decode_values(DType::F32, model.data()),
        vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    );
}
