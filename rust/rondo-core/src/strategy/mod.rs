//! The aggregation seam: what the aggregator's round book asks of an aggregation rule.
//!
//! A [`Strategy`] is chosen once, at start-up, and lives across rounds (state such as a server
//! optimizer's moments belongs to it). For each training round it makes a [`RoundAggregation`]:
//! accepted updates are added to it one at a time, possibly from several threads at once, and
//! when the round closes it is consumed into the next global model, with the previous model
//! at hand for rules that step from it.
//!
//! The book never looks inside: FedAvg's streaming sum ([`crate::aggregate`]) is the first
//! implementation, and rules that hold every update of a round, or a Python plug-in, fit the
//! same two calls. [`build`] makes the native rule a config names, from its
//! [`options::Options`].

pub mod options;
pub mod robust;
pub mod server_opt;

use std::fmt::Debug;
use std::sync::Arc;

use bytes::Bytes;

use crate::aggregate::{AccumulatorOptions, FedAvgAccumulator, ModelBuffer, Update};
use crate::model::{ModelMismatch, ModelSpec};
pub use options::{OptionError, Options};

/// The names of the native strategies, as the config selects them.
pub const NATIVE: &[&str] = &[
    "fedavg",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "bulyan",
];

/// The native strategy called `name`, with its `options` (every one of which it must know).
/// `accumulation` says how the rules that fold updates as they arrive meet concurrent uploads.
pub fn build(
    name: &str,
    mut options: Options,
    accumulation: AccumulatorOptions,
) -> Result<Arc<dyn Strategy>, OptionError> {
    let strategy: Arc<dyn Strategy> = match name {
        "fedavg" => Arc::new(FedAvg {
            options: accumulation,
        }),
        "median" => Arc::new(robust::Median::from_options(&mut options)?),
        "trimmed_mean" => Arc::new(robust::TrimmedMean::from_options(&mut options)?),
        "krum" => Arc::new(robust::Krum::from_options(&mut options)?),
        "multi_krum" => Arc::new(robust::MultiKrum::from_options(&mut options)?),
        "bulyan" => Arc::new(robust::Bulyan::from_options(&mut options)?),
        "fedavgm" | "fedadam" | "fedyogi" | "fedadagrad" => {
            server_opt::build(name, &mut options, accumulation)?
        }
        other => {
            return Err(OptionError::strategy(
                other,
                format!("is not a native strategy (one of {})", NATIVE.join(", ")),
            ));
        }
    };
    options.finish(name)?;
    Ok(strategy)
}

/// One round's aggregation in progress.
pub trait RoundAggregation: Send + Sync + Debug {
    /// The model every update must match.
    fn spec(&self) -> &ModelSpec;

    /// Adds one accepted update; nothing is added when it does not match [`Self::spec`].
    /// Returns once the update is part of the round.
    fn add(&self, update: Update) -> Result<(), ModelMismatch>;

    /// Updates added so far.
    fn updates(&self) -> usize;

    /// Consumes the round into the next model's file buffer (the data after the reserved
    /// header prefix). `previous` is the data of the global model the round started from
    /// (`None` in round 0). An `Err` names why no model could be made; the round then fails.
    fn finalize(self: Box<Self>, previous: Option<&[u8]>) -> Result<Finalized, String>;
}

/// A round's next model, and whether the rule already checked that it is finite (so the book
/// need not read it again; it checks every model for which this is `false`).
#[derive(Debug)]
pub struct Finalized {
    pub model: ModelBuffer,
    pub checked_finite: bool,
}

/// Why a round's model is refused: it is not finite.
pub const NOT_FINITE: &str = "the aggregated model is not finite (the weighted sum overflowed); the previous global model stays";

/// An aggregation rule: makes each round's [`RoundAggregation`].
pub trait Strategy: Send + Sync + Debug {
    /// The name the config selects it by.
    fn name(&self) -> &'static str;

    /// A training round's aggregation (see [`RoundStart`]). Called off the book's lock; the
    /// book makes round 0 (the initial model) with plain [`FedAvg`], whatever the strategy.
    fn begin_round(&self, start: RoundStart) -> Box<dyn RoundAggregation>;

    /// Whether updates are kept in memory until the round closes (so the staging buffers
    /// they arrived in cannot be reused for the next upload).
    fn holds_updates(&self) -> bool;

    /// The state the rule carries from round to round (a server optimizer's moments), as
    /// bytes to keep beside the round's model, so that a restarted aggregator carries on with
    /// it ([`Strategy::restore_state`]). `None`: the rule has none (yet).
    fn saved_state(&self) -> Option<Vec<u8>> {
        None
    }

    /// Takes back what [`Strategy::saved_state`] returned; refuses bytes it cannot use,
    /// changing nothing.
    fn restore_state(&self, _state: &[u8]) -> Result<(), String> {
        Err(format!(
            "the {} rule keeps no state across rounds",
            self.name()
        ))
    }
}

/// What a round's aggregation starts from.
#[derive(Debug)]
pub struct RoundStart {
    pub round: u32,
    /// The model every update must match.
    pub spec: ModelSpec,
    /// Bytes (a multiple of 8) the finalized buffer leaves for the model file's header.
    pub prefix: usize,
    /// Model-sized memory from an earlier round that the rule may build its state in instead
    /// of mapping fresh memory.
    pub spare: Option<Vec<u64>>,
    /// The data section of the global model the round starts from (`None` in round 0); the
    /// same bytes [`RoundAggregation::finalize`] gets.
    pub previous: Option<Bytes>,
}

impl RoundStart {
    /// A round of `spec` with no header room, no spare memory and no previous model: for
    /// tests and benchmarks.
    pub fn bare(round: u32, spec: ModelSpec) -> Self {
        Self {
            round,
            spec,
            prefix: 0,
            spare: None,
            previous: None,
        }
    }
}

/// Weighted FedAvg (McMahan et al. 2017): `Σ nᵢ·wᵢ / Σ nᵢ`, folded as updates arrive.
#[derive(Debug, Clone, Copy, Default)]
pub struct FedAvg {
    pub options: AccumulatorOptions,
}

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn begin_round(&self, start: RoundStart) -> Box<dyn RoundAggregation> {
        Box::new(FedAvgAccumulator::with_prefix_reusing(
            start.spec,
            self.options,
            start.prefix,
            start.spare,
        ))
    }

    fn holds_updates(&self) -> bool {
        self.options.deterministic
    }
}

impl RoundAggregation for FedAvgAccumulator {
    fn spec(&self) -> &ModelSpec {
        FedAvgAccumulator::spec(self)
    }

    fn add(&self, update: Update) -> Result<(), ModelMismatch> {
        FedAvgAccumulator::add(self, update)
    }

    fn updates(&self) -> usize {
        FedAvgAccumulator::updates(self)
    }

    fn finalize(self: Box<Self>, _previous: Option<&[u8]>) -> Result<Finalized, String> {
        match (*self).finalize_checked() {
            None => Err("no update with a positive sample count was added".to_string()),
            Some((_, false)) => Err(NOT_FINITE.to_string()),
            Some((model, true)) => Ok(Finalized {
                model,
                checked_finite: true,
            }),
        }
    }
}

/// Whether every value of a model's data section (tensors back to back, in `spec`'s order) is
/// finite: a model that is not must never be published.
pub fn model_is_finite(spec: &ModelSpec, data: &[u8]) -> bool {
    let mut offset = 0;
    spec.tensors.iter().all(|tensor| {
        let bytes = &data[offset..offset + tensor.byte_len()];
        offset += tensor.byte_len();
        crate::kernels::all_finite(tensor.dtype, bytes)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::AccumulationMode;
    use crate::kernels::{decode_values, encode_values};
    use crate::model::{DType, TensorSpec};

    fn spec() -> ModelSpec {
        ModelSpec {
            tensors: vec![TensorSpec {
                name: "w".into(),
                dtype: DType::F32,
                shape: vec![2],
            }],
        }
    }

    fn update(values: &[f64], weight: f64) -> Update {
        Update {
            key: format!("{values:?}"),
            spec: spec(),
            data: encode_values(DType::F32, values).into(),
            weight,
            metrics: Default::default(),
        }
    }

    #[test]
    fn fedavg_through_the_seam_is_the_weighted_average() {
        let round = FedAvg::default().begin_round(RoundStart {
            prefix: 8,
            ..RoundStart::bare(1, spec())
        });
        round.add(update(&[1.0, 2.0], 1.0)).unwrap();
        round.add(update(&[4.0, 8.0], 3.0)).unwrap();
        assert_eq!(round.updates(), 2);
        let model = round.finalize(None).unwrap().model;
        assert_eq!(decode_values(DType::F32, model.data()), vec![3.25, 6.5]);
    }

    #[test]
    fn an_empty_round_names_why_it_has_no_model() {
        let round = FedAvg::default().begin_round(RoundStart::bare(1, spec()));
        assert!(round.finalize(None).unwrap_err().contains("no update"));
    }

    #[test]
    fn finite_weights_can_sum_to_inf_and_the_check_sees_it() {
        // 3e38 is a finite f32, and so is the weight; their weighted sum is not.
        for mode in [AccumulationMode::Blocked, AccumulationMode::Hogwild] {
            let options = AccumulatorOptions {
                mode,
                deterministic: false,
            };
            let round = FedAvg { options }.begin_round(RoundStart::bare(1, spec()));
            round.add(update(&[3e38, 1.0], 1e9)).unwrap();
            round.add(update(&[3e38, 1.0], 1e9)).unwrap();
            assert_eq!(round.finalize(None).unwrap_err(), NOT_FINITE, "{mode:?}");
        }
        let acc = FedAvgAccumulator::new(spec(), AccumulatorOptions::default());
        acc.add(update(&[3e38, 1.0], 1e9)).unwrap();
        acc.add(update(&[3e38, 1.0], 1e9)).unwrap();
        let model = acc.finalize().unwrap();
        assert!(!model_is_finite(&spec(), model.data()));
        let fine = encode_values(DType::F32, &[3e38, -3e38]);
        assert!(model_is_finite(&spec(), &fine));
    }
}
