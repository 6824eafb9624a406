//! Server optimizers: FedAvgM (Hsu et al. 2019) and FedAdagrad, FedAdam, FedYogi (Reddi et al.
//! 2021, "Adaptive Federated Optimization", Algorithm 2). The round's FedAvg average is read as
//! a step the participants propose from the previous global model, and an optimizer on the
//! server decides how far to take it.
//!
//! With `x_t` the model the round started from and `avg` the round's average, the
//! pseudo-gradient is `Δ_t = avg − x_t`, and per element:
//!
//! - `fedavgm`: `m_t = β·m_{t−1} + Δ_t`, `x_{t+1} = x_t + η·m_t`. With `beta = 0`, `eta = 1` it
//!   is FedAvg.
//! - `fedadagrad`: `m_t = β1·m_{t−1} + (1−β1)·Δ_t`, `v_t = v_{t−1} + Δ_t²`,
//!   `x_{t+1} = x_t + η·m_t / (√v_t + τ)`.
//! - `fedadam`: the same `m_t`, `v_t = β2·v_{t−1} + (1−β2)·Δ_t²`.
//! - `fedyogi`: the same `m_t`, `v_t = v_{t−1} − (1−β2)·Δ_t²·sign(v_{t−1} − Δ_t²)`, with
//!   `sign(0) = 0`.
//!
//! Choices, where the papers leave room or Rondo differs:
//!
//! - `avg` is Rondo's FedAvg: weighted by each update's `n_samples`, and computed by the same
//!   streaming accumulation (its modes, its in-place sum, `deterministic`). Reddi et al. average
//!   the clients' updates uniformly; weighting by samples keeps these rules consistent with
//!   `fedavg`, and a uniform average is FedAvg with equal sample counts.
//! - `m` starts at 0 and `v` at `τ²` (the paper asks `v_{−1} ≥ τ²`). No bias correction: the
//!   paper has none, and `τ` already bounds the first steps.
//! - Every element is computed in `f64`, from the model's stored values, and written back in the
//!   model's dtype.
//! - In a round with no previous model (round 0 without an initial model) the average is the
//!   model, unchanged, and the optimizer state is not touched.
//! - The state lives in memory only: a restarted aggregator starts again from `m = 0`,
//!   `v = τ²`. It starts again too when the model's spec (names, dtypes, shapes, order)
//!   changes.
//!
//! Memory: the model, plus `m` (fedavgm) or `m` and `v` (the adaptive ones), each laid out like
//! the model's elements, `f32` for `F32`/`F16`/`BF16` tensors and `f64` for `F64` ones. For a
//! 100 MB `f32` model, fedadam keeps 200 MB more than fedavg, and no more than that: there is no
//! second copy of the state (see [`ServerOptRound::finalize`] for how a failed step still
//! leaves it untouched), except for the one close at which the model's spec changes, when the
//! old state is kept until the new one has been stepped.
//!
//! A round whose new model, or new `m` or `v` in its storage type, is not finite fails with
//! [`NOT_FINITE`]; the previous global model stays and so does the state, exactly, so the next
//! round steps as if the failed one had never been.

use std::fmt;
use std::sync::Arc;

use half::{bf16, f16};
use parking_lot::Mutex;
use rayon::prelude::*;

use super::{
    FedAvg, Finalized, NOT_FINITE, OptionError, Options, RoundAggregation, RoundStart, Strategy,
};
use crate::aggregate::{AccumulatorOptions, Update};
use crate::kernels::{self, PAR_CHUNK};
use crate::model::{DType, ModelMismatch, ModelSpec};

/// The names of the server optimizers, as the config selects them.
pub const NAMES: [&str; 4] = ["fedavgm", "fedadam", "fedyogi", "fedadagrad"];

/// The server optimizer called `name` (one of [`NAMES`]), taking its knobs from `options`.
pub fn build(
    name: &str,
    options: &mut Options,
    accumulation: AccumulatorOptions,
) -> Result<Arc<dyn Strategy>, OptionError> {
    Ok(match name {
        "fedavgm" => Arc::new(ServerOpt::<FedAvgM>::from_options(options, accumulation)?),
        "fedadagrad" => Arc::new(ServerOpt::<FedAdagrad>::from_options(
            options,
            accumulation,
        )?),
        "fedadam" => Arc::new(ServerOpt::<FedAdam>::from_options(options, accumulation)?),
        "fedyogi" => Arc::new(ServerOpt::<FedYogi>::from_options(options, accumulation)?),
        other => {
            return Err(OptionError::strategy(
                other,
                format!("is not a server optimizer (one of {})", NAMES.join(", ")),
            ));
        }
    })
}

/// One element's step: what to add to `x_t`, and the new moments.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    pub dx: f64,
    pub m: f64,
    /// Unused by rules without a second moment.
    pub v: f64,
}

/// A server optimizer's update rule, per element.
pub trait Rule: Copy + fmt::Debug + Send + Sync + 'static {
    /// The name the config selects it by.
    const NAME: &'static str;
    /// Whether it keeps `v` besides `m`.
    const SECOND_MOMENT: bool;

    /// The rule with its knobs from `options` (defaults for those not given).
    fn from_options(options: &mut Options) -> Result<Self, OptionError>;

    /// `v` before the first round.
    fn initial_v(&self) -> f64;

    /// The step for pseudo-gradient `delta` from moments `m`, `v` (`v` is 0 without a second
    /// moment).
    fn step(&self, delta: f64, m: f64, v: f64) -> Step;
}

/// FedAvgM: server momentum. `m_t = β·m_{t−1} + Δ_t`, `x_{t+1} = x_t + η·m_t`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedAvgM {
    /// `eta`: the server learning rate, above 0 and at most 1000; default 1.0.
    pub eta: f64,
    /// `beta`: the momentum, from 0 up to (not including) 1; default 0.9.
    pub beta: f64,
}

/// FedAdagrad: `m_t = β1·m_{t−1} + (1−β1)·Δ_t`, `v_t = v_{t−1} + Δ_t²`,
/// `x_{t+1} = x_t + η·m_t/(√v_t + τ)`; `m` starts at 0, `v` at `τ²`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedAdagrad {
    /// `eta`: the server learning rate, above 0 and at most 1000; default 0.1.
    pub eta: f64,
    /// `beta1`: the first moment's decay, from 0 up to (not including) 1; default 0.9.
    pub beta1: f64,
    /// `tau`: the adaptivity, above 0 and at most 1; default 1e-3.
    pub tau: f64,
}

/// FedAdam: as [`FedAdagrad`], with `v_t = β2·v_{t−1} + (1−β2)·Δ_t²`. No bias correction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedAdam {
    /// `eta`: the server learning rate, above 0 and at most 1000; default 0.1.
    pub eta: f64,
    /// `beta1`: the first moment's decay, from 0 up to (not including) 1; default 0.9.
    pub beta1: f64,
    /// `beta2`: the second moment's decay, from 0 up to (not including) 1; default 0.99.
    pub beta2: f64,
    /// `tau`: the adaptivity, above 0 and at most 1; default 1e-3.
    pub tau: f64,
}

/// FedYogi: as [`FedAdagrad`], with `v_t = v_{t−1} − (1−β2)·Δ_t²·sign(v_{t−1} − Δ_t²)`
/// (`sign(0) = 0`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedYogi {
    /// `eta`: the server learning rate, above 0 and at most 1000; default 0.1.
    pub eta: f64,
    /// `beta1`: the first moment's decay, from 0 up to (not including) 1; default 0.9.
    pub beta1: f64,
    /// `beta2`: the second moment's decay, from 0 up to (not including) 1; default 0.99.
    pub beta2: f64,
    /// `tau`: the adaptivity, above 0 and at most 1; default 1e-3.
    pub tau: f64,
}

/// Server learning rates above 1000 only make sense for a model that is not learning.
fn eta(options: &mut Options, default: f64) -> Result<f64, OptionError> {
    options.positive("eta", default, 1e3)
}

/// A decay or momentum: at 1 the moment would never forget (and FedAvgM's would grow without
/// bound), so 1 itself is refused.
fn decay(options: &mut Options, name: &str, default: f64) -> Result<f64, OptionError> {
    const RULE: &str = "must be a finite number from 0 up to (not including) 1";
    let value = options
        .number(name, default, 0.0, 1.0)
        .map_err(|e| OptionError {
            rule: RULE.into(),
            ..e
        })?;
    if value >= 1.0 {
        return Err(OptionError::new(name, Some(value), RULE));
    }
    Ok(value)
}

fn tau(options: &mut Options) -> Result<f64, OptionError> {
    options.positive("tau", 1e-3, 1.0)
}

/// The adaptive rules' shared step, given the new `v`.
#[inline(always)]
fn adaptive(eta: f64, beta1: f64, tau: f64, delta: f64, m: f64, v: f64) -> Step {
    let m = beta1 * m + (1.0 - beta1) * delta;
    Step {
        dx: eta * m / (v.sqrt() + tau),
        m,
        v,
    }
}

impl Rule for FedAvgM {
    const NAME: &'static str = "fedavgm";
    const SECOND_MOMENT: bool = false;

    fn from_options(options: &mut Options) -> Result<Self, OptionError> {
        Ok(Self {
            eta: eta(options, 1.0)?,
            beta: decay(options, "beta", 0.9)?,
        })
    }

    fn initial_v(&self) -> f64 {
        0.0
    }

    #[inline(always)]
    fn step(&self, delta: f64, m: f64, _v: f64) -> Step {
        let m = self.beta * m + delta;
        Step {
            dx: self.eta * m,
            m,
            v: 0.0,
        }
    }
}

impl Rule for FedAdagrad {
    const NAME: &'static str = "fedadagrad";
    const SECOND_MOMENT: bool = true;

    fn from_options(options: &mut Options) -> Result<Self, OptionError> {
        Ok(Self {
            eta: eta(options, 0.1)?,
            beta1: decay(options, "beta1", 0.9)?,
            tau: tau(options)?,
        })
    }

    fn initial_v(&self) -> f64 {
        self.tau * self.tau
    }

    #[inline(always)]
    fn step(&self, delta: f64, m: f64, v: f64) -> Step {
        let v = v + delta * delta;
        adaptive(self.eta, self.beta1, self.tau, delta, m, v)
    }
}

impl Rule for FedAdam {
    const NAME: &'static str = "fedadam";
    const SECOND_MOMENT: bool = true;

    fn from_options(options: &mut Options) -> Result<Self, OptionError> {
        Ok(Self {
            eta: eta(options, 0.1)?,
            beta1: decay(options, "beta1", 0.9)?,
            beta2: decay(options, "beta2", 0.99)?,
            tau: tau(options)?,
        })
    }

    fn initial_v(&self) -> f64 {
        self.tau * self.tau
    }

    #[inline(always)]
    fn step(&self, delta: f64, m: f64, v: f64) -> Step {
        let v = self.beta2 * v + (1.0 - self.beta2) * delta * delta;
        adaptive(self.eta, self.beta1, self.tau, delta, m, v)
    }
}

impl Rule for FedYogi {
    const NAME: &'static str = "fedyogi";
    const SECOND_MOMENT: bool = true;

    fn from_options(options: &mut Options) -> Result<Self, OptionError> {
        Ok(Self {
            eta: eta(options, 0.1)?,
            beta1: decay(options, "beta1", 0.9)?,
            beta2: decay(options, "beta2", 0.99)?,
            tau: tau(options)?,
        })
    }

    fn initial_v(&self) -> f64 {
        self.tau * self.tau
    }

    #[inline(always)]
    fn step(&self, delta: f64, m: f64, v: f64) -> Step {
        let square = delta * delta;
        // Not f64::signum, which is 1 at 0: where v already equals Δ², Yogi leaves it.
        let sign = if v > square {
            1.0
        } else if v < square {
            -1.0
        } else {
            0.0
        };
        // v stays ≥ 0: it only shrinks where v > Δ², by at most (1−β2)·Δ² < v.
        let v = v - (1.0 - self.beta2) * square * sign;
        adaptive(self.eta, self.beta1, self.tau, delta, m, v)
    }
}

/// The moments of the elements kept at one width, in the model's element order.
#[derive(Default)]
struct Moments<S> {
    m: Vec<S>,
    /// Empty for rules without a second moment.
    v: Vec<S>,
}

impl<S: Copy + Send + Sync> Moments<S> {
    fn new(len: usize, second: bool, v0: S, zero: S) -> Self {
        Self {
            m: filled(len, zero),
            v: if second { filled(len, v0) } else { Vec::new() },
        }
    }
}

/// A model-sized vector of `value`, written in parallel (a serial fill of hundreds of
/// megabytes would hold up the first round's close).
fn filled<S: Copy + Send + Sync>(len: usize, value: S) -> Vec<S> {
    let mut out = Vec::with_capacity(len);
    crate::memory::advise_huge_pages(&mut out);
    (0..len)
        .into_par_iter()
        .map(|_| value)
        .collect_into_vec(&mut out);
    out
}

/// The optimizer's state across rounds, for one model spec: `F64` tensors' moments in `wide`,
/// every other tensor's in `narrow`, each in the model's tensor order.
struct State {
    spec: ModelSpec,
    narrow: Moments<f32>,
    wide: Moments<f64>,
}

impl State {
    fn new(spec: &ModelSpec, second: bool, v0: f64) -> Self {
        let (wide, narrow): (Vec<_>, Vec<_>) =
            spec.tensors.iter().partition(|t| t.dtype == DType::F64);
        let count = |ts: Vec<&crate::model::TensorSpec>| -> usize {
            ts.iter().map(|t| t.element_count()).sum()
        };
        Self {
            spec: spec.clone(),
            narrow: Moments::new(count(narrow), second, v0 as f32, 0.0),
            wide: Moments::new(count(wide), second, v0, 0.0),
        }
    }

    fn bytes(&self) -> usize {
        4 * (self.narrow.m.len() + self.narrow.v.len())
            + 8 * (self.wide.m.len() + self.wide.v.len())
    }
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("tensors", &self.spec.tensors.len())
            .field("narrow_elements", &self.narrow.m.len())
            .field("wide_elements", &self.wide.m.len())
            .field(
                "second_moment",
                &!(self.narrow.v.is_empty() && self.wide.v.is_empty()),
            )
            .finish()
    }
}

/// A server optimizer as a [`Strategy`]: each round is FedAvg's accumulation, and its finalize
/// takes the optimizer's step. The state is shared with every round it makes.
pub struct ServerOpt<R> {
    pub rule: R,
    pub accumulation: AccumulatorOptions,
    state: Arc<Mutex<Option<State>>>,
}

impl<R: Rule> ServerOpt<R> {
    pub fn new(rule: R, accumulation: AccumulatorOptions) -> Self {
        Self {
            rule,
            accumulation,
            state: Arc::new(Mutex::new(None)),
        }
    }

    /// The optimizer with its knobs from `options` (each default where one is not given).
    pub fn from_options(
        options: &mut Options,
        accumulation: AccumulatorOptions,
    ) -> Result<Self, OptionError> {
        Ok(Self::new(R::from_options(options)?, accumulation))
    }
}

impl<R: fmt::Debug> fmt::Debug for ServerOpt<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerOpt")
            .field("rule", &self.rule)
            .field("accumulation", &self.accumulation)
            .field("state", &*self.state.lock())
            .finish()
    }
}

impl<R: Rule> Strategy for ServerOpt<R> {
    fn name(&self) -> &'static str {
        R::NAME
    }

    fn begin_round(&self, start: RoundStart) -> Box<dyn RoundAggregation> {
        let inner = FedAvg {
            options: self.accumulation,
        }
        .begin_round(start);
        Box::new(ServerOptRound {
            rule: self.rule,
            inner,
            state: Arc::clone(&self.state),
        })
    }

    fn holds_updates(&self) -> bool {
        self.accumulation.deterministic
    }

    fn saved_state(&self) -> Option<Vec<u8>> {
        self.state
            .lock()
            .as_ref()
            .map(|state| state.to_bytes(R::NAME))
    }

    fn restore_state(&self, bytes: &[u8]) -> Result<(), String> {
        let state = State::from_bytes(bytes, R::NAME, R::SECOND_MOMENT)?;
        *self.state.lock() = Some(state);
        Ok(())
    }
}

/// The saved form of a [`State`]: this line, a JSON header (rule, spec, element counts), a
/// newline, then `m` and `v` of the narrow moments (f32) and of the wide ones (f64), each
/// little-endian.
const STATE_MAGIC: &[u8] = b"rondo-optimizer-state 1\n";

#[derive(serde::Serialize, serde::Deserialize)]
struct StateHeader {
    rule: String,
    spec: ModelSpec,
    narrow_m: usize,
    narrow_v: usize,
    wide_m: usize,
    wide_v: usize,
}

impl State {
    fn to_bytes(&self, rule: &str) -> Vec<u8> {
        let header = StateHeader {
            rule: rule.to_string(),
            spec: self.spec.clone(),
            narrow_m: self.narrow.m.len(),
            narrow_v: self.narrow.v.len(),
            wide_m: self.wide.m.len(),
            wide_v: self.wide.v.len(),
        };
        let header = serde_json::to_vec(&header).unwrap_or_default();
        let mut out = Vec::with_capacity(STATE_MAGIC.len() + header.len() + 1 + self.bytes());
        out.extend_from_slice(STATE_MAGIC);
        out.extend_from_slice(&header);
        out.push(b'\n');
        for part in [&self.narrow.m, &self.narrow.v] {
            for x in part {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        for part in [&self.wide.m, &self.wide.v] {
            for x in part {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        out
    }

    fn from_bytes(bytes: &[u8], rule: &str, second: bool) -> Result<Self, String> {
        let rest = bytes
            .strip_prefix(STATE_MAGIC)
            .ok_or("not a saved optimizer state")?;
        let end = rest
            .iter()
            .position(|b| *b == b'\n')
            .ok_or("the saved optimizer state has no header")?;
        let header: StateHeader = serde_json::from_slice(&rest[..end])
            .map_err(|e| format!("the saved optimizer state's header: {e}"))?;
        if header.rule != rule {
            return Err(format!(
                "the saved optimizer state is {}'s, not {rule}'s",
                header.rule
            ));
        }
        let count = |wide: bool| -> usize {
            header
                .spec
                .tensors
                .iter()
                .filter(|t| (t.dtype == DType::F64) == wide)
                .map(|t| t.element_count())
                .sum()
        };
        let (narrow, wide) = (count(false), count(true));
        let expected = [
            narrow,
            if second { narrow } else { 0 },
            wide,
            if second { wide } else { 0 },
        ];
        let counts = [
            header.narrow_m,
            header.narrow_v,
            header.wide_m,
            header.wide_v,
        ];
        let data = &rest[end + 1..];
        if counts != expected
            || data.len() != 4 * (counts[0] + counts[1]) + 8 * (counts[2] + counts[3])
        {
            return Err("the saved optimizer state does not fit its model".to_string());
        }
        let (narrow, wide) = data.split_at(4 * (counts[0] + counts[1]));
        let f32s: Vec<f32> = narrow
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let f64s: Vec<f64> = wide
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let (nm, nv) = f32s.split_at(counts[0]);
        let (wm, wv) = f64s.split_at(counts[2]);
        Ok(Self {
            spec: header.spec,
            narrow: Moments {
                m: nm.to_vec(),
                v: nv.to_vec(),
            },
            wide: Moments {
                m: wm.to_vec(),
                v: wv.to_vec(),
            },
        })
    }
}

/// One round of a [`ServerOpt`]: FedAvg's aggregation, and the optimizer's state.
pub struct ServerOptRound<R> {
    rule: R,
    inner: Box<dyn RoundAggregation>,
    state: Arc<Mutex<Option<State>>>,
}

impl<R: fmt::Debug> fmt::Debug for ServerOptRound<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerOptRound")
            .field("rule", &self.rule)
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<R: Rule> RoundAggregation for ServerOptRound<R> {
    fn spec(&self) -> &ModelSpec {
        self.inner.spec()
    }

    fn add(&self, update: Update) -> Result<(), ModelMismatch> {
        self.inner.add(update)
    }

    fn updates(&self) -> usize {
        self.inner.updates()
    }

    /// FedAvg's finalize, then the optimizer's step over the average, in place.
    ///
    /// The step is two-phase: a read-only pass computes every new element and checks that the
    /// model, `m` and `v` would all be finite, and only then a second pass computes them again
    /// (the same arithmetic, so the same values) and writes them. A failed step therefore
    /// leaves the state exactly as it was without a second copy of it. The price is time: the
    /// step runs twice, which about doubles it (`benches/server_opt.rs`: for a 100 MB f32
    /// model, tens of milliseconds more per round close). Computing into a spare copy and
    /// swapping would save that, but the copy is two more model-sized buffers for fedadam
    /// (200 MB for a 100 MB model) held for the aggregator's life, against an invariant that
    /// its memory is a small multiple of the model; a round's close is rare next to that.
    fn finalize(self: Box<Self>, previous: Option<&[u8]>) -> Result<Finalized, String> {
        let Self { rule, inner, state } = *self;
        let spec = inner.spec().clone();
        let finalized = inner.finalize(previous)?;
        let Some(previous) = previous else {
            return Ok(finalized);
        };
        if previous.len() != spec.byte_len() {
            return Err(format!(
                "the previous model has {} bytes of tensor data, the round's model {}",
                previous.len(),
                spec.byte_len()
            ));
        }
        let mut model = finalized.model;
        let mut shared = state.lock();
        // A state for another spec (or none yet) is replaced only once the step has succeeded.
        let mut fresh = match &*shared {
            Some(state) if state.spec == spec => None,
            _ => Some(State::new(&spec, R::SECOND_MOMENT, rule.initial_v())),
        };
        let current = match fresh.as_mut() {
            Some(fresh) => fresh,
            None => shared.as_mut().ok_or("the optimizer state went missing")?,
        };
        let mut work = pieces(&spec, previous, model.data_mut(), current)
            .ok_or("the optimizer state does not fit the round's model")?;
        if !work
            .par_iter_mut()
            .all(|piece| piece.run::<R, false>(&rule))
        {
            return Err(NOT_FINITE.to_string());
        }
        work.par_iter_mut().for_each(|piece| {
            piece.run::<R, true>(&rule);
        });
        drop(work);
        if let Some(fresh) = fresh
            && let Some(old) = shared.replace(fresh)
        {
            let bytes = old.bytes();
            crate::memory::drop_large(old, bytes);
        }
        Ok(Finalized {
            model,
            checked_finite: true,
        })
    }
}

/// A model dtype, and the width its moments are kept at.
trait Layout {
    const DTYPE: DType;
    type Moment: Moment;
    /// Whether `x` is finite once written as `DTYPE`.
    fn stored_finite(x: f64) -> bool;
}

trait Moment: Copy + Send + Sync {
    fn get(self) -> f64;
    fn narrow(x: f64) -> Self;
    fn finite(self) -> bool;
}

impl Moment for f32 {
    #[inline(always)]
    fn get(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn narrow(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn finite(self) -> bool {
        self.is_finite()
    }
}

impl Moment for f64 {
    #[inline(always)]
    fn get(self) -> f64 {
        self
    }
    #[inline(always)]
    fn narrow(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn finite(self) -> bool {
        self.is_finite()
    }
}

struct F32;
struct F64;
struct F16;
struct BF16;

impl Layout for F32 {
    const DTYPE: DType = DType::F32;
    type Moment = f32;
    #[inline(always)]
    fn stored_finite(x: f64) -> bool {
        (x as f32).is_finite()
    }
}

impl Layout for F64 {
    const DTYPE: DType = DType::F64;
    type Moment = f64;
    #[inline(always)]
    fn stored_finite(x: f64) -> bool {
        x.is_finite()
    }
}

impl Layout for F16 {
    const DTYPE: DType = DType::F16;
    type Moment = f32;
    #[inline(always)]
    fn stored_finite(x: f64) -> bool {
        f16::from_f64(x).is_finite()
    }
}

impl Layout for BF16 {
    const DTYPE: DType = DType::BF16;
    type Moment = f32;
    #[inline(always)]
    fn stored_finite(x: f64) -> bool {
        bf16::from_f64(x).is_finite()
    }
}

/// A stretch of one tensor: the previous model's bytes, the average's (to be overwritten by
/// the next model's), and the moments of the same elements.
struct Piece<'a, S> {
    previous: &'a [u8],
    model: &'a mut [u8],
    m: &'a mut [S],
    /// Empty for rules without a second moment.
    v: &'a mut [S],
}

/// One parallel work item of the step, by the dtype of its tensor.
enum Work<'a> {
    F32(Piece<'a, f32>),
    F64(Piece<'a, f64>),
    F16(Piece<'a, f32>),
    BF16(Piece<'a, f32>),
}

impl Work<'_> {
    /// Validates (`COMMIT = false`: writes nothing, returns whether every result is finite) or
    /// writes (`COMMIT = true`) this piece's step.
    fn run<R: Rule, const COMMIT: bool>(&mut self, rule: &R) -> bool {
        match self {
            Work::F32(piece) => run_piece::<R, F32, COMMIT>(rule, piece),
            Work::F64(piece) => run_piece::<R, F64, COMMIT>(rule, piece),
            Work::F16(piece) => run_piece::<R, F16, COMMIT>(rule, piece),
            Work::BF16(piece) => run_piece::<R, BF16, COMMIT>(rule, piece),
        }
    }
}

fn run_piece<R: Rule, L: Layout, const COMMIT: bool>(
    rule: &R,
    piece: &mut Piece<'_, L::Moment>,
) -> bool {
    let size = L::DTYPE.size_bytes();
    let elements = piece
        .previous
        .chunks_exact(size)
        .zip(piece.model.chunks_exact_mut(size))
        .zip(piece.m.iter_mut());
    let mut finite = true;
    if R::SECOND_MOMENT {
        for (((previous, model), m), v) in elements.zip(piece.v.iter_mut()) {
            finite &= element::<R, L, COMMIT>(rule, previous, model, m, Some(v));
        }
    } else {
        for ((previous, model), m) in elements {
            finite &= element::<R, L, COMMIT>(rule, previous, model, m, None);
        }
    }
    finite
}

#[inline(always)]
fn element<R: Rule, L: Layout, const COMMIT: bool>(
    rule: &R,
    previous: &[u8],
    model: &mut [u8],
    m: &mut L::Moment,
    v: Option<&mut L::Moment>,
) -> bool {
    let x = kernels::read(L::DTYPE, previous);
    let delta = kernels::read(L::DTYPE, model) - x;
    let step = rule.step(delta, m.get(), v.as_deref().map_or(0.0, |v| v.get()));
    let next = x + step.dx;
    let (m_next, v_next) = (L::Moment::narrow(step.m), L::Moment::narrow(step.v));
    if COMMIT {
        kernels::write(L::DTYPE, next, model);
        *m = m_next;
        if let Some(v) = v {
            *v = v_next;
        }
        true
    } else {
        L::stored_finite(next) & m_next.finite() & (v.is_none() | v_next.finite())
    }
}

/// The step's work items: each tensor cut into pieces of [`PAR_CHUNK`] elements, over one
/// list, so that a model of many small tensors is still one parallel pass. `None` when the
/// sizes disagree (they cannot: all three are laid out from `spec`).
fn pieces<'a>(
    spec: &ModelSpec,
    mut previous: &'a [u8],
    mut model: &'a mut [u8],
    state: &'a mut State,
) -> Option<Vec<Work<'a>>> {
    let mut narrow = (&mut state.narrow.m[..], &mut state.narrow.v[..]);
    let mut wide = (&mut state.wide.m[..], &mut state.wide.v[..]);
    let mut work = Vec::with_capacity(spec.element_count() / PAR_CHUNK + spec.tensors.len());
    for tensor in &spec.tensors {
        let bytes = tensor.byte_len();
        let (previous_t, rest) = previous.split_at_checked(bytes)?;
        previous = rest;
        let (model_t, rest) = std::mem::take(&mut model).split_at_mut_checked(bytes)?;
        model = rest;
        let n = tensor.element_count();
        match tensor.dtype {
            DType::F64 => {
                let (m, v) = take_moments(&mut wide, n)?;
                cut(previous_t, model_t, m, v, 8, Work::F64, &mut work);
            }
            dtype => {
                let (m, v) = take_moments(&mut narrow, n)?;
                let (size, wrap): (_, fn(Piece<'a, f32>) -> Work<'a>) = match dtype {
                    DType::F16 => (2, Work::F16),
                    DType::BF16 => (2, Work::BF16),
                    _ => (4, Work::F32),
                };
                cut(previous_t, model_t, m, v, size, wrap, &mut work);
            }
        }
    }
    Some(work)
}

/// The moments of the next `n` elements (no `v` when the state keeps none).
fn take_moments<'a, S>(
    moments: &mut (&'a mut [S], &'a mut [S]),
    n: usize,
) -> Option<(&'a mut [S], &'a mut [S])> {
    let (m, rest) = std::mem::take(&mut moments.0).split_at_mut_checked(n)?;
    moments.0 = rest;
    let v = if moments.1.is_empty() {
        Default::default()
    } else {
        let (v, rest) = std::mem::take(&mut moments.1).split_at_mut_checked(n)?;
        moments.1 = rest;
        v
    };
    Some((m, v))
}

fn cut<'a, S>(
    previous: &'a [u8],
    model: &'a mut [u8],
    m: &'a mut [S],
    v: &'a mut [S],
    size: usize,
    wrap: fn(Piece<'a, S>) -> Work<'a>,
    work: &mut Vec<Work<'a>>,
) {
    let v_chunks = v
        .chunks_mut(PAR_CHUNK)
        .chain(std::iter::repeat_with(<&mut [S]>::default));
    for (((previous, model), m), v) in previous
        .chunks(PAR_CHUNK * size)
        .zip(model.chunks_mut(PAR_CHUNK * size))
        .zip(m.chunks_mut(PAR_CHUNK))
        .zip(v_chunks)
    {
        work.push(wrap(Piece {
            previous,
            model,
            m,
            v,
        }));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::aggregate::AccumulationMode;
    use crate::kernels::{decode_values, encode_values};
    use crate::model::TensorSpec;
    use crate::strategy::{NATIVE, build as build_native};

    fn options(pairs: &[(&str, f64)]) -> Options {
        Options::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<BTreeMap<_, _>>(),
        )
    }

    fn model(tensors: &[(DType, usize)]) -> ModelSpec {
        ModelSpec {
            tensors: tensors
                .iter()
                .enumerate()
                .map(|(i, (dtype, n))| TensorSpec {
                    name: format!("t{i}"),
                    dtype: *dtype,
                    shape: vec![*n],
                })
                .collect(),
        }
    }

    fn encode(spec: &ModelSpec, values: &[f64]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut start = 0;
        for t in &spec.tensors {
            out.extend(encode_values(
                t.dtype,
                &values[start..start + t.element_count()],
            ));
            start += t.element_count();
        }
        out
    }

    fn decode(spec: &ModelSpec, mut bytes: &[u8]) -> Vec<f64> {
        let mut out = Vec::new();
        for t in &spec.tensors {
            let (here, rest) = bytes.split_at(t.byte_len());
            out.extend(decode_values(t.dtype, here));
            bytes = rest;
        }
        out
    }

    /// `values` as a model of `spec` holds them.
    fn stored(spec: &ModelSpec, values: &[f64]) -> Vec<f64> {
        decode(spec, &encode(spec, values))
    }

    fn dtypes(spec: &ModelSpec) -> Vec<DType> {
        spec.tensors
            .iter()
            .flat_map(|t| std::iter::repeat_n(t.dtype, t.element_count()))
            .collect()
    }

    /// The rules as the reference computes them: written from the formulas alone.
    #[derive(Debug, Clone, Copy)]
    enum Formula {
        AvgM {
            eta: f64,
            beta: f64,
        },
        Adagrad {
            eta: f64,
            beta1: f64,
            tau: f64,
        },
        Adam {
            eta: f64,
            beta1: f64,
            beta2: f64,
            tau: f64,
        },
        Yogi {
            eta: f64,
            beta1: f64,
            beta2: f64,
            tau: f64,
        },
    }

    /// The optimizer in plain f64 loops, state and all.
    struct Reference {
        formula: Formula,
        m: Vec<f64>,
        v: Vec<f64>,
    }

    fn sign(x: f64) -> f64 {
        if x > 0.0 {
            1.0
        } else if x < 0.0 {
            -1.0
        } else {
            0.0
        }
    }

    impl Reference {
        fn new(formula: Formula, n: usize) -> Self {
            let tau = match formula {
                Formula::AvgM { .. } => 0.0,
                Formula::Adagrad { tau, .. }
                | Formula::Adam { tau, .. }
                | Formula::Yogi { tau, .. } => tau,
            };
            Self {
                formula,
                m: vec![0.0; n],
                v: vec![tau * tau; n],
            }
        }

        /// `x_{t+1}` from `x_t` and the round's average.
        fn step(&mut self, x: &[f64], avg: &[f64]) -> Vec<f64> {
            let mut next = vec![0.0; x.len()];
            for i in 0..x.len() {
                let d = avg[i] - x[i];
                let (m, v) = (&mut self.m[i], &mut self.v[i]);
                next[i] = match self.formula {
                    Formula::AvgM { eta, beta } => {
                        *m = beta * *m + d;
                        x[i] + eta * *m
                    }
                    Formula::Adagrad { eta, beta1, tau } => {
                        *m = beta1 * *m + (1.0 - beta1) * d;
                        *v += d * d;
                        x[i] + eta * *m / (v.sqrt() + tau)
                    }
                    Formula::Adam {
                        eta,
                        beta1,
                        beta2,
                        tau,
                    } => {
                        *m = beta1 * *m + (1.0 - beta1) * d;
                        *v = beta2 * *v + (1.0 - beta2) * d * d;
                        x[i] + eta * *m / (v.sqrt() + tau)
                    }
                    Formula::Yogi {
                        eta,
                        beta1,
                        beta2,
                        tau,
                    } => {
                        *m = beta1 * *m + (1.0 - beta1) * d;
                        *v -= (1.0 - beta2) * d * d * sign(*v - d * d);
                        x[i] + eta * *m / (v.sqrt() + tau)
                    }
                };
            }
            next
        }
    }

    type Rules = Vec<(&'static str, Vec<(&'static str, f64)>, Formula)>;

    /// Every rule with its defaults, and with other values for every knob.
    fn rules() -> Rules {
        let adam = |eta, beta1, beta2, tau| Formula::Adam {
            eta,
            beta1,
            beta2,
            tau,
        };
        let yogi = |eta, beta1, beta2, tau| Formula::Yogi {
            eta,
            beta1,
            beta2,
            tau,
        };
        let custom = vec![
            ("eta", 0.05),
            ("beta1", 0.8),
            ("beta2", 0.95),
            ("tau", 0.01),
        ];
        vec![
            (
                "fedavgm",
                vec![],
                Formula::AvgM {
                    eta: 1.0,
                    beta: 0.9,
                },
            ),
            (
                "fedavgm",
                vec![("eta", 0.7), ("beta", 0.6)],
                Formula::AvgM {
                    eta: 0.7,
                    beta: 0.6,
                },
            ),
            (
                "fedadagrad",
                vec![],
                Formula::Adagrad {
                    eta: 0.1,
                    beta1: 0.9,
                    tau: 1e-3,
                },
            ),
            (
                "fedadagrad",
                vec![("eta", 0.05), ("beta1", 0.8), ("tau", 0.01)],
                Formula::Adagrad {
                    eta: 0.05,
                    beta1: 0.8,
                    tau: 0.01,
                },
            ),
            ("fedadam", vec![], adam(0.1, 0.9, 0.99, 1e-3)),
            ("fedadam", custom.clone(), adam(0.05, 0.8, 0.95, 0.01)),
            ("fedyogi", vec![], yogi(0.1, 0.9, 0.99, 1e-3)),
            ("fedyogi", custom, yogi(0.05, 0.8, 0.95, 0.01)),
        ]
    }

    fn make(
        name: &str,
        pairs: &[(&str, f64)],
        accumulation: AccumulatorOptions,
    ) -> Arc<dyn Strategy> {
        build_native(name, options(pairs), accumulation).expect("valid options")
    }

    const ACCUMULATIONS: [AccumulatorOptions; 4] = [
        AccumulatorOptions {
            mode: AccumulationMode::Blocked,
            deterministic: false,
        },
        AccumulatorOptions {
            mode: AccumulationMode::Locked,
            deterministic: false,
        },
        AccumulatorOptions {
            mode: AccumulationMode::Hogwild,
            deterministic: false,
        },
        AccumulatorOptions {
            mode: AccumulationMode::Blocked,
            deterministic: true,
        },
    ];

    /// One round's updates: their values (as the model's dtypes hold them) and sample counts.
    type Round = Vec<(Vec<f64>, f64)>;

    /// Several participants, each near `around` (as trained models are near the one they
    /// started from), with sample counts from 1 to 1000.
    fn random_round(rng: &mut StdRng, spec: &ModelSpec, around: &[f64]) -> Round {
        let participants = rng.random_range(2..=5);
        (0..participants)
            .map(|_| {
                let values: Vec<f64> = around
                    .iter()
                    .map(|x| x + rng.random_range(-0.1..0.1))
                    .collect();
                (
                    stored(spec, &values),
                    f64::from(rng.random_range(1..=1000u32)),
                )
            })
            .collect()
    }

    fn random_model(rng: &mut StdRng, spec: &ModelSpec) -> Vec<f64> {
        let values: Vec<f64> = (0..spec.element_count())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        stored(spec, &values)
    }

    /// The round through `strategy`: its next model's data, or why there is none.
    fn run(
        strategy: &dyn Strategy,
        spec: &ModelSpec,
        round: &Round,
        previous: Option<&[u8]>,
    ) -> Result<Vec<u8>, String> {
        let aggregation = strategy.begin_round(RoundStart {
            prefix: 8,
            ..RoundStart::bare(1, spec.clone())
        });
        for (k, (values, n)) in round.iter().enumerate() {
            aggregation
                .add(Update {
                    key: format!("p{k}"),
                    spec: spec.clone(),
                    data: encode(spec, values).into(),
                    weight: *n,
                    metrics: Default::default(),
                })
                .expect("the update fits");
        }
        assert_eq!(aggregation.updates(), round.len());
        aggregation.finalize(previous).map(|finalized| {
            assert!(finalized.checked_finite);
            finalized.model.data().to_vec()
        })
    }

    /// The sample-weighted average, as a model of `spec` holds it.
    fn average(spec: &ModelSpec, round: &Round) -> Vec<f64> {
        let total: f64 = round.iter().map(|(_, n)| n).sum();
        let values: Vec<f64> = (0..spec.element_count())
            .map(|i| round.iter().map(|(v, n)| n * v[i]).sum::<f64>() / total)
            .collect();
        stored(spec, &values)
    }

    /// Asserts `got` is within `tolerance(dtype)` of `expected`, relative to the model's scale
    /// (values here are of order 1, so elements near 0 are held to the same absolute bound).
    fn assert_close(
        spec: &ModelSpec,
        got: &[f64],
        expected: &[f64],
        tolerance: fn(DType) -> f64,
        context: &str,
    ) {
        for (i, ((got, expected), dtype)) in got.iter().zip(expected).zip(dtypes(spec)).enumerate()
        {
            let bound = tolerance(dtype) * expected.abs().max(1.0);
            assert!(
                (got - expected).abs() <= bound,
                "{context}: element {i} ({dtype}) is {got}, the formulas give {expected}"
            );
        }
    }

    /// Five rounds of every rule against [`Reference`]. The reference's model is held in the
    /// model's dtypes between rounds and so is the average, as Rondo publishes both; its
    /// moments and arithmetic are exact f64.
    fn check_against_reference(
        spec: &ModelSpec,
        accumulation: AccumulatorOptions,
        tolerance: fn(DType) -> f64,
        seed: u64,
    ) {
        for (name, pairs, formula) in rules() {
            let mut rng = StdRng::seed_from_u64(seed);
            let strategy = make(name, &pairs, accumulation);
            assert_eq!(strategy.name(), name);
            let mut expected = random_model(&mut rng, spec);
            let mut global = encode(spec, &expected);
            let mut reference = Reference::new(formula, spec.element_count());
            for round_index in 0..5 {
                let round = random_round(&mut rng, spec, &decode(spec, &global));
                global = run(&*strategy, spec, &round, Some(&global)).expect("a finite step");
                expected = stored(spec, &reference.step(&expected, &average(spec, &round)));
                let context = format!("{name} {pairs:?} {accumulation:?} round {round_index}");
                assert_close(spec, &decode(spec, &global), &expected, tolerance, &context);
            }
        }
    }

    /// f32 models to 1e-5 (seen: under 1e-6) and f64 ones to 1e-12 (seen: 1e-15); 16-bit ones
    /// to one unit in their last place at 1 (seen: equal), which a different rounding of the
    /// average (f32 sums here, f64 in the reference) could cost.
    fn tolerance(dtype: DType) -> f64 {
        match dtype {
            DType::F32 => 1e-5,
            DType::F64 => 1e-12,
            DType::F16 => 2f64.powi(-10),
            DType::BF16 => 2f64.powi(-7),
        }
    }

    #[test]
    fn every_rule_follows_its_formulas_over_five_rounds_in_f32_and_f64() {
        for accumulation in ACCUMULATIONS {
            check_against_reference(
                &model(&[(DType::F32, 37), (DType::F32, 300)]),
                accumulation,
                tolerance,
                1,
            );
        }
        check_against_reference(
            &model(&[(DType::F64, 37), (DType::F64, 300)]),
            AccumulatorOptions::default(),
            tolerance,
            2,
        );
    }

    #[test]
    fn every_rule_follows_its_formulas_in_16_bit_and_mixed_models() {
        check_against_reference(
            &model(&[(DType::F16, 200)]),
            AccumulatorOptions::default(),
            tolerance,
            3,
        );
        check_against_reference(
            &model(&[(DType::BF16, 200)]),
            AccumulatorOptions::default(),
            tolerance,
            4,
        );
        let mixed = model(&[
            (DType::F32, 50),
            (DType::F64, 40),
            (DType::F16, 30),
            (DType::BF16, 30),
            (DType::F64, 5),
        ]);
        for accumulation in [ACCUMULATIONS[0], ACCUMULATIONS[2]] {
            check_against_reference(&mixed, accumulation, tolerance, 5);
        }
    }

    #[test]
    fn a_tensor_of_many_work_items_is_stepped_whole() {
        let spec = model(&[(DType::F32, 2 * PAR_CHUNK + 3), (DType::F64, 3)]);
        let (name, pairs, formula) = rules().swap_remove(5);
        assert_eq!(name, "fedadam");
        let mut rng = StdRng::seed_from_u64(6);
        let strategy = make(name, &pairs, AccumulatorOptions::default());
        let mut expected = random_model(&mut rng, &spec);
        let mut global = encode(&spec, &expected);
        let mut reference = Reference::new(formula, spec.element_count());
        for round_index in 0..2 {
            let round = random_round(&mut rng, &spec, &decode(&spec, &global));
            global = run(&*strategy, &spec, &round, Some(&global)).unwrap();
            expected = stored(&spec, &reference.step(&expected, &average(&spec, &round)));
            let context = format!("round {round_index}");
            assert_close(
                &spec,
                &decode(&spec, &global),
                &expected,
                tolerance,
                &context,
            );
        }
    }

    #[test]
    fn fedavgm_without_momentum_at_rate_one_is_fedavg() {
        let spec = model(&[
            (DType::F32, 40),
            (DType::F64, 20),
            (DType::F16, 10),
            (DType::BF16, 10),
        ]);
        for accumulation in ACCUMULATIONS {
            let mut rng = StdRng::seed_from_u64(7);
            let fedavg = FedAvg {
                options: accumulation,
            };
            let fedavgm = make("fedavgm", &[("eta", 1.0), ("beta", 0.0)], accumulation);
            assert_eq!(fedavgm.holds_updates(), accumulation.deterministic);
            let mut global = encode(&spec, &random_model(&mut rng, &spec));
            for _ in 0..3 {
                let round = random_round(&mut rng, &spec, &decode(&spec, &global));
                let plain = run(&fedavg, &spec, &round, Some(&global)).unwrap();
                let stepped = run(&*fedavgm, &spec, &round, Some(&global)).unwrap();
                // x + (avg − x) is avg exactly when the difference is exact, as it is in f64
                // for narrower values; an f64 difference may round, by an ulp.
                for ((a, b), dtype) in decode(&spec, &plain)
                    .iter()
                    .zip(decode(&spec, &stepped))
                    .zip(dtypes(&spec))
                {
                    match dtype {
                        DType::F64 => assert!((a - b).abs() <= 1e-15, "{a} vs {b}"),
                        _ => assert_eq!(a.to_bits(), b.to_bits(), "{dtype} {accumulation:?}"),
                    }
                }
                global = plain;
            }
        }
    }

    #[test]
    fn a_step_that_is_not_finite_fails_and_leaves_the_state_as_it_was() {
        let spec = model(&[(DType::F32, 6), (DType::F64, 2)]);
        // fedavgm's model overflows (η·m ≈ 6e38); the adaptive rules' v does (Δ² ≈ 9e76).
        let cases = [
            (
                "fedavgm",
                vec![("eta", 2.0)],
                Formula::AvgM {
                    eta: 2.0,
                    beta: 0.9,
                },
            ),
            ("fedadagrad", vec![], rules()[2].2),
            ("fedadam", vec![], rules()[4].2),
            ("fedyogi", vec![], rules()[6].2),
        ];
        for (name, pairs, formula) in cases {
            let mut rng = StdRng::seed_from_u64(8);
            let x0 = random_model(&mut rng, &spec);
            let good: Vec<Round> = (0..3).map(|_| random_round(&mut rng, &spec, &x0)).collect();
            // One element far out, so that the rest of the model would step: a pass that wrote
            // as it went would have changed their moments. One participant of one sample, so
            // that FedAvg's sum itself stays finite.
            let mut bad = random_round(&mut rng, &spec, &x0);
            bad.truncate(1);
            bad[0].0[2] = 3e38;
            bad[0].1 = 1.0;
            // Finite updates whose weighted sum overflows: FedAvg itself fails.
            let mut overflow = random_round(&mut rng, &spec, &x0);
            for (values, n) in &mut overflow {
                values[1] = 3e38;
                *n = 1e9;
            }
            let fedavg = FedAvg::default();
            let x0_bytes = encode(&spec, &x0);
            assert!(run(&fedavg, &spec, &bad, Some(&x0_bytes)).is_ok());
            assert!(run(&fedavg, &spec, &overflow, Some(&x0_bytes)).is_err());

            let failing = make(name, &pairs, AccumulatorOptions::default());
            let clean = make(name, &pairs, AccumulatorOptions::default());
            let mut reference = Reference::new(formula, spec.element_count());
            let (mut a, mut b) = (encode(&spec, &x0), encode(&spec, &x0));
            let mut expected = x0.clone();
            // The very first step fails too: the state is still to be made, and is not.
            assert_eq!(
                run(&*failing, &spec, &bad, Some(&a)),
                Err(NOT_FINITE.into())
            );
            for (i, round) in good.iter().enumerate() {
                a = run(&*failing, &spec, round, Some(&a)).unwrap();
                b = run(&*clean, &spec, round, Some(&b)).unwrap();
                assert_eq!(a, b, "{name} round {i}: the failed rounds left no trace");
                expected = stored(&spec, &reference.step(&expected, &average(&spec, round)));
                let context = format!("{name} round {i}");
                assert_close(&spec, &decode(&spec, &a), &expected, tolerance, &context);
                let next_failure = if i % 2 == 0 { &bad } else { &overflow };
                assert_eq!(
                    run(&*failing, &spec, next_failure, Some(&a)),
                    Err(NOT_FINITE.into()),
                    "{name} round {i}"
                );
            }
        }
    }

    #[test]
    fn a_step_past_a_16_bit_dtype_is_refused() {
        // f16 ends at 65504, bf16 near f32's end: each step lands past its dtype's range.
        for (dtype, far) in [(DType::F16, 6e4), (DType::BF16, 3e38)] {
            let spec = model(&[(dtype, 4)]);
            let strategy = make("fedavgm", &[("eta", 2.0)], AccumulatorOptions::default());
            let global = encode(&spec, &[0.5; 4]);
            let round: Round = vec![(stored(&spec, &[0.5, far, 0.5, 0.5]), 3.0)];
            assert_eq!(
                run(&*strategy, &spec, &round, Some(&global)),
                Err(NOT_FINITE.into()),
                "{dtype}"
            );
        }
    }

    #[test]
    fn without_a_previous_model_the_average_is_the_model_and_the_state_waits() {
        let spec = model(&[(DType::F32, 5), (DType::BF16, 3)]);
        let mut rng = StdRng::seed_from_u64(9);
        let x0 = random_model(&mut rng, &spec);
        let round = random_round(&mut rng, &spec, &x0);
        let strategy =
            ServerOpt::<FedAdam>::from_options(&mut Options::none(), AccumulatorOptions::default())
                .unwrap();
        let average = run(&FedAvg::default(), &spec, &round, None).unwrap();
        assert_eq!(run(&strategy, &spec, &round, None).unwrap(), average);
        assert!(strategy.state.lock().is_none());

        let error = run(&strategy, &spec, &round, Some(&average[1..])).unwrap_err();
        assert!(error.contains("previous model"), "{error}");
        assert!(strategy.state.lock().is_none());
        run(&strategy, &spec, &round, Some(&average)).unwrap();
        assert!(strategy.state.lock().is_some());
    }

    #[test]
    fn the_state_starts_again_for_another_model() {
        let (a, b) = (model(&[(DType::F32, 4)]), model(&[(DType::F32, 6)]));
        let mut rng = StdRng::seed_from_u64(10);
        let yogi = || {
            ServerOpt::<FedYogi>::from_options(&mut Options::none(), AccumulatorOptions::default())
                .unwrap()
        };
        let (strategy, fresh) = (yogi(), yogi());
        let mut global = encode(&a, &random_model(&mut rng, &a));
        for _ in 0..2 {
            let round = random_round(&mut rng, &a, &decode(&a, &global));
            global = run(&strategy, &a, &round, Some(&global)).unwrap();
        }
        let x0 = encode(&b, &random_model(&mut rng, &b));
        let round = random_round(&mut rng, &b, &decode(&b, &x0));
        assert_eq!(
            run(&strategy, &b, &round, Some(&x0)).unwrap(),
            run(&fresh, &b, &round, Some(&x0)).unwrap()
        );
        assert_eq!(strategy.state.lock().as_ref().map(|s| &s.spec), Some(&b));
    }

    #[test]
    fn options_default_to_the_papers_and_bad_ones_are_refused_by_name() {
        let none = || Options::none();
        assert_eq!(
            FedAvgM::from_options(&mut none()),
            Ok(FedAvgM {
                eta: 1.0,
                beta: 0.9
            })
        );
        assert_eq!(
            FedAdagrad::from_options(&mut none()),
            Ok(FedAdagrad {
                eta: 0.1,
                beta1: 0.9,
                tau: 1e-3
            })
        );
        let adam = FedAdam {
            eta: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        };
        assert_eq!(FedAdam::from_options(&mut none()), Ok(adam));
        assert_eq!(
            FedYogi::from_options(&mut none()),
            Ok(FedYogi {
                eta: 0.1,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3
            })
        );
        for name in NAMES {
            let strategy = make(name, &[], AccumulatorOptions::default());
            assert_eq!(strategy.name(), name);
            assert!(NATIVE.contains(&name));
        }
        // The edges of every range are allowed.
        make(
            "fedadam",
            &[("eta", 1e3), ("beta1", 0.0), ("beta2", 0.0), ("tau", 1.0)],
            AccumulatorOptions::default(),
        );

        let accumulation = AccumulatorOptions::default();
        for (name, option, value) in [
            ("fedavgm", "eta", 0.0),
            ("fedavgm", "eta", 1000.5),
            ("fedavgm", "beta", 1.0),
            ("fedavgm", "beta", -0.1),
            ("fedadagrad", "tau", 0.0),
            ("fedadagrad", "tau", 1.5),
            ("fedadagrad", "beta1", 1.0),
            ("fedadam", "beta2", 1.0),
            ("fedadam", "eta", -1.0),
            ("fedyogi", "beta2", 2.0),
            ("fedyogi", "eta", f64::NAN),
            ("fedyogi", "tau", f64::INFINITY),
        ] {
            let error = build_native(name, options(&[(option, value)]), accumulation).unwrap_err();
            let case = format!("{name} {option} = {value}");
            assert_eq!(error.key, format!("aggregation.options.{option}"), "{case}");
            assert_eq!(error.value, Some(value.to_string()), "{case}");
        }
        let error = build_native("fedadam", options(&[("beta1", 1.0)]), accumulation).unwrap_err();
        assert_eq!(
            error.to_string(),
            "aggregation.options.beta1 = 1: must be a finite number from 0 up to (not including) 1"
        );

        for (name, option) in [
            ("fedadagrad", "beta2"),
            ("fedavgm", "tau"),
            ("fedadam", "beta"),
            ("fedyogi", "typo"),
        ] {
            let error = build_native(name, options(&[(option, 0.5)]), accumulation).unwrap_err();
            assert_eq!(
                error.to_string(),
                format!("aggregation.options.{option}: is not an option of strategy \"{name}\"")
            );
        }
    }

    #[test]
    fn a_saved_state_carries_the_optimizer_on_exactly_in_a_new_aggregator() {
        let spec = model(&[(DType::F32, 37), (DType::F64, 5), (DType::BF16, 9)]);
        for name in ["fedavgm", "fedadagrad", "fedadam", "fedyogi"] {
            let mut rng = StdRng::seed_from_u64(11);
            let running = make(name, &[], ACCUMULATIONS[0]);
            assert!(
                running.saved_state().is_none(),
                "{name}: no state before a step"
            );
            let mut x = random_model(&mut rng, &spec);
            for _ in 0..2 {
                let round = random_round(&mut rng, &spec, &x);
                let next = run(&*running, &spec, &round, Some(&encode(&spec, &x))).unwrap();
                x = decode(&spec, &next);
            }
            let saved = running.saved_state().expect("a state after two steps");
            // A restarted aggregator: a fresh rule, given the saved state back.
            let restarted = make(name, &[], ACCUMULATIONS[0]);
            restarted.restore_state(&saved).expect("its own state");
            assert_eq!(restarted.saved_state().as_deref(), Some(&saved[..]));
            let round = random_round(&mut rng, &spec, &x);
            let previous = encode(&spec, &x);
            let carried_on = run(&*running, &spec, &round, Some(&previous)).unwrap();
            let resumed = run(&*restarted, &spec, &round, Some(&previous)).unwrap();
            assert_eq!(carried_on, resumed, "{name}: the same step, bit for bit");
            let forgotten = make(name, &[], ACCUMULATIONS[0]);
            let from_zero = run(&*forgotten, &spec, &round, Some(&previous)).unwrap();
            assert_ne!(carried_on, from_zero, "{name}: the state matters");
        }
        // Bytes it cannot use are refused and change nothing.
        let adam = make("fedadam", &[], ACCUMULATIONS[0]);
        let avgm = make("fedavgm", &[], ACCUMULATIONS[0]);
        let mut rng = StdRng::seed_from_u64(3);
        let x = random_model(&mut rng, &spec);
        let round = random_round(&mut rng, &spec, &x);
        run(&*avgm, &spec, &round, Some(&encode(&spec, &x))).unwrap();
        let avgm_state = avgm.saved_state().unwrap();
        assert!(
            adam.restore_state(&avgm_state)
                .unwrap_err()
                .contains("fedavgm")
        );
        assert!(
            adam.restore_state(&avgm_state[..avgm_state.len() - 1])
                .is_err()
        );
        assert!(adam.restore_state(b"junk").is_err());
        assert!(adam.saved_state().is_none());
        assert!(
            make("fedavg", &[], ACCUMULATIONS[0])
                .restore_state(&avgm_state)
                .is_err()
        );
    }
}
