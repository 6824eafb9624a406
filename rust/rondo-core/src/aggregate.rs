//! Weighted FedAvg: a running weighted sum that accepted updates are folded into as they
//! arrive, and a finalize pass that divides by the total weight.
//!
//! Sums are `f32` for `F32`/`F16`/`BF16` models and `f64` for `F64` ones. How concurrent
//! uploads meet the sum is the [`AccumulationMode`]:
//!
//! - `Blocked` (default): group commit. An update joins a queue; whoever holds the sum folds
//!   everything queued in one pass ([`kernels::fold_many_f32`]), so under load several updates
//!   share one read-modify-write of the sum.
//! - `Locked`: each update takes the sum's lock and folds alone.
//! - `Hogwild`: updates add into a shared sum of atomics without any lock
//!   ([`kernels::hogwild_add_f32`]); simultaneous additions to one element may lose one.
//!
//! With `deterministic`, updates are held until finalize and folded in the order of their keys
//! (participant ids), so the result is bit-for-bit the same whatever the arrival order. That
//! holds every update in memory until the round closes: opt in only where reproducibility is
//! worth O(participants × model) memory.

use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::kernels::{self, Term};
use crate::model::{DType, ModelMismatch, ModelSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccumulationMode {
    #[default]
    Blocked,
    Locked,
    Hogwild,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AccumulatorOptions {
    pub mode: AccumulationMode,
    pub deterministic: bool,
}

/// An accepted update, owned: its tensors' bytes back to back in the order of `spec`.
#[derive(Debug)]
pub struct Update {
    /// Orders updates in deterministic mode (the participant id).
    pub key: String,
    pub spec: ModelSpec,
    pub data: Vec<u8>,
    pub weight: f64,
}

#[derive(Debug)]
enum PlainSum {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

#[derive(Debug)]
enum AtomicSum {
    F32(Vec<AtomicU32>),
    F64(Vec<AtomicU64>),
}

#[derive(Debug)]
enum Sums {
    Plain(Mutex<Vec<PlainSum>>),
    Atomic(Vec<AtomicSum>),
}

#[derive(Debug, Default)]
struct Totals {
    weight: f64,
    updates: usize,
}

/// The weighted sum of the updates accepted so far in one round. Shared by reference between
/// concurrent uploads.
#[derive(Debug)]
pub struct FedAvgAccumulator {
    spec: ModelSpec,
    options: AccumulatorOptions,
    sums: Sums,
    /// Blocked mode: updates waiting for the next fold pass. Deterministic mode: every update
    /// of the round, folded at finalize.
    queue: Mutex<Vec<Update>>,
    totals: Mutex<Totals>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are only changed by infallible arithmetic, so a poisoned lock still
    // guards consistent data.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn sum_is_f64(dtype: DType) -> bool {
    dtype == DType::F64
}

impl FedAvgAccumulator {
    pub fn new(spec: ModelSpec, options: AccumulatorOptions) -> Self {
        let sums = match options.mode {
            AccumulationMode::Hogwild if !options.deterministic => Sums::Atomic(
                spec.tensors
                    .iter()
                    .map(|t| {
                        let n = t.element_count();
                        if sum_is_f64(t.dtype) {
                            AtomicSum::F64((0..n).map(|_| AtomicU64::new(0)).collect())
                        } else {
                            AtomicSum::F32((0..n).map(|_| AtomicU32::new(0)).collect())
                        }
                    })
                    .collect(),
            ),
            _ => Sums::Plain(Mutex::new(
                spec.tensors
                    .iter()
                    .map(|t| {
                        let n = t.element_count();
                        if sum_is_f64(t.dtype) {
                            PlainSum::F64(vec![0.0; n])
                        } else {
                            PlainSum::F32(vec![0.0; n])
                        }
                    })
                    .collect(),
            )),
        };
        Self {
            spec,
            options,
            sums,
            queue: Mutex::new(Vec::new()),
            totals: Mutex::new(Totals::default()),
        }
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn updates(&self) -> usize {
        lock(&self.totals).updates
    }

    pub fn total_weight(&self) -> f64 {
        lock(&self.totals).weight
    }

    /// Adds `weight × update` to the sum. The update must match this model by names, dtypes and
    /// shapes (it may order its tensors differently); nothing is added when it does not.
    /// Returns once the update is part of the sum (or, in deterministic mode, held for it).
    pub fn add(&self, update: Update) -> Result<(), ModelMismatch> {
        self.spec.check_update(&update.spec)?;
        assert_eq!(
            update.data.len(),
            update.spec.byte_len(),
            "caller must pass exactly the update's bytes"
        );
        let weight = update.weight;
        if self.options.deterministic {
            lock(&self.queue).push(update);
        } else {
            match (&self.sums, self.options.mode) {
                (Sums::Atomic(sums), _) => self.fold_hogwild(sums, &update),
                (Sums::Plain(sums), AccumulationMode::Locked) => {
                    let mut sums = lock(sums);
                    self.fold_plain(&mut sums, std::slice::from_ref(&update));
                }
                (Sums::Plain(sums), _) => {
                    lock(&self.queue).push(update);
                    // Whoever gets the sum folds everything queued by then, ours included
                    // (or a previous holder already folded ours: the queue is then empty).
                    let mut sums = lock(sums);
                    let batch = std::mem::take(&mut *lock(&self.queue));
                    self.fold_plain(&mut sums, &batch);
                }
            }
        }
        let mut totals = lock(&self.totals);
        totals.weight += weight;
        totals.updates += 1;
        Ok(())
    }

    /// The tensor terms of `updates` for sum tensor `index`.
    fn terms<'a>(&self, index: usize, updates: &'a [Update]) -> Vec<Term<'a>> {
        let name = &self.spec.tensors[index].name;
        updates
            .iter()
            .map(|u| {
                let mut offset = 0;
                for t in &u.spec.tensors {
                    if &t.name == name {
                        return Term {
                            bytes: &u.data[offset..offset + t.byte_len()],
                            dtype: t.dtype,
                            weight: u.weight,
                        };
                    }
                    offset += t.byte_len();
                }
                unreachable!("check_update guarantees every model tensor is in the update")
            })
            .collect()
    }

    fn fold_plain(&self, sums: &mut [PlainSum], updates: &[Update]) {
        if updates.is_empty() {
            return;
        }
        for (index, sum) in sums.iter_mut().enumerate() {
            let terms = self.terms(index, updates);
            match sum {
                PlainSum::F32(acc) => kernels::fold_many_f32(acc, &terms),
                PlainSum::F64(acc) => kernels::fold_many_f64(acc, &terms),
            }
        }
    }

    fn fold_hogwild(&self, sums: &[AtomicSum], update: &Update) {
        for (index, sum) in sums.iter().enumerate() {
            let term = self.terms(index, std::slice::from_ref(update))[0];
            match sum {
                AtomicSum::F32(acc) => kernels::hogwild_add_f32(acc, term),
                AtomicSum::F64(acc) => kernels::hogwild_add_f64(acc, term),
            }
        }
    }

    /// Writes `sum / total_weight` into `out`, laid out in this model's tensor order and dtypes.
    /// Returns `false` (and leaves `out` untouched) when no update was added. Call it once no
    /// `add` is in flight.
    pub fn finalize_into(&self, out: &mut [u8]) -> bool {
        assert_eq!(
            out.len(),
            self.spec.byte_len(),
            "output must hold the model"
        );
        let total_weight = self.total_weight();
        if self.updates() == 0 || total_weight <= 0.0 {
            return false;
        }
        if self.options.deterministic {
            let mut held = std::mem::take(&mut *lock(&self.queue));
            held.sort_by(|a, b| a.key.cmp(&b.key));
            if let Sums::Plain(sums) = &self.sums {
                self.fold_plain(&mut lock(sums), &held);
            }
        }
        let scale = 1.0 / total_weight;
        let mut offset = 0;
        for (index, tensor) in self.spec.tensors.iter().enumerate() {
            let out = &mut out[offset..offset + tensor.byte_len()];
            offset += tensor.byte_len();
            match &self.sums {
                Sums::Plain(sums) => match &lock(sums)[index] {
                    PlainSum::F32(acc) => kernels::write_scaled_f32(acc, tensor.dtype, scale, out),
                    PlainSum::F64(acc) => kernels::write_scaled_f64(acc, tensor.dtype, scale, out),
                },
                Sums::Atomic(sums) => match &sums[index] {
                    AtomicSum::F32(acc) => {
                        kernels::write_scaled_atomic_f32(acc, tensor.dtype, scale, out)
                    }
                    AtomicSum::F64(acc) => {
                        kernels::write_scaled_atomic_f64(acc, tensor.dtype, scale, out)
                    }
                },
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{decode_values, encode_values};
    use crate::model::TensorSpec;

    const MODES: [AccumulationMode; 3] = [
        AccumulationMode::Blocked,
        AccumulationMode::Locked,
        AccumulationMode::Hogwild,
    ];

    fn one_tensor(dtype: DType, len: usize) -> ModelSpec {
        ModelSpec {
            tensors: vec![TensorSpec {
                name: "w".into(),
                dtype,
                shape: vec![len],
            }],
        }
    }

    fn update(spec: &ModelSpec, dtype: DType, values: &[f64], weight: f64) -> Update {
        Update {
            key: format!("{values:?}"),
            spec: spec.clone(),
            data: encode_values(dtype, values),
            weight,
        }
    }

    fn finalize(acc: &FedAvgAccumulator) -> Vec<f64> {
        let mut out = vec![0u8; acc.spec().byte_len()];
        assert!(acc.finalize_into(&mut out));
        decode_values(acc.spec().tensors[0].dtype, &out)
    }

    #[test]
    fn weighted_average_in_every_dtype_and_mode() {
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            for mode in MODES {
                for deterministic in [false, true] {
                    let spec = one_tensor(dtype, 3);
                    let acc = FedAvgAccumulator::new(
                        spec.clone(),
                        AccumulatorOptions {
                            mode,
                            deterministic,
                        },
                    );
                    acc.add(update(&spec, dtype, &[1.0, 2.0, -4.0], 1.0))
                        .unwrap();
                    acc.add(update(&spec, dtype, &[3.0, 0.0, 4.0], 3.0))
                        .unwrap();
                    // (1·1 + 3·3)/4, (2·1 + 0·3)/4, (−4·1 + 4·3)/4: exact in every dtype.
                    assert_eq!(finalize(&acc), vec![2.5, 0.5, 2.0], "{dtype} {mode:?}");
                }
            }
        }
    }

    #[test]
    fn concurrent_uploads_all_count_in_locking_modes() {
        let len = kernels::PAR_CHUNK + 3;
        let spec = one_tensor(DType::F32, len);
        for mode in [AccumulationMode::Blocked, AccumulationMode::Locked] {
            let acc = FedAvgAccumulator::new(
                spec.clone(),
                AccumulatorOptions {
                    mode,
                    deterministic: false,
                },
            );
            std::thread::scope(|scope| {
                for k in 0..8 {
                    let (acc, spec) = (&acc, &spec);
                    scope.spawn(move || {
                        acc.add(update(spec, DType::F32, &vec![f64::from(k); len], 1.0))
                            .unwrap();
                    });
                }
            });
            assert_eq!(acc.updates(), 8);
            assert!(finalize(&acc).iter().all(|v| *v == 3.5), "{mode:?}");
        }
    }

    #[test]
    fn deterministic_mode_ignores_arrival_order() {
        let spec = one_tensor(DType::F32, 4);
        let values = [
            [0.1, 1e7, -3.3, 2.0],
            [1e-3, -1e7, 7.7, 0.5],
            [5.5, 0.25, 1e-7, -9.0],
        ];
        let run = |order: &[usize]| {
            let acc = FedAvgAccumulator::new(
                spec.clone(),
                AccumulatorOptions {
                    mode: AccumulationMode::Blocked,
                    deterministic: true,
                },
            );
            for &i in order {
                acc.add(update(&spec, DType::F32, &values[i], (i + 1) as f64 * 0.3))
                    .unwrap();
            }
            let mut out = vec![0u8; spec.byte_len()];
            acc.finalize_into(&mut out);
            out
        };
        let reference = run(&[0, 1, 2]);
        for order in [[2, 1, 0], [1, 0, 2], [2, 0, 1]] {
            assert_eq!(run(&order), reference, "order {order:?}");
        }
    }

    #[test]
    fn mismatched_update_adds_nothing() {
        let spec = one_tensor(DType::F32, 2);
        let acc = FedAvgAccumulator::new(spec.clone(), AccumulatorOptions::default());
        acc.add(update(&spec, DType::F32, &[1.0, 1.0], 1.0))
            .unwrap();
        let wrong = one_tensor(DType::F32, 3);
        assert!(acc.add(update(&wrong, DType::F32, &[9.0; 3], 1.0)).is_err());
        assert_eq!(acc.updates(), 1);
        assert_eq!(finalize(&acc), vec![1.0, 1.0]);
    }

    #[test]
    fn tensors_in_another_order_land_by_name() {
        let t = |name: &str, len| TensorSpec {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![len],
        };
        let global = ModelSpec {
            tensors: vec![t("a", 1), t("b", 2)],
        };
        let reordered = ModelSpec {
            tensors: vec![t("b", 2), t("a", 1)],
        };
        let acc = FedAvgAccumulator::new(global.clone(), AccumulatorOptions::default());
        acc.add(Update {
            key: "p".into(),
            spec: reordered,
            data: encode_values(DType::F32, &[2.0, 3.0, 1.0]),
            weight: 1.0,
        })
        .unwrap();
        let mut out = vec![0u8; global.byte_len()];
        acc.finalize_into(&mut out);
        assert_eq!(decode_values(DType::F32, &out), vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn empty_round_has_no_result() {
        let spec = one_tensor(DType::F32, 2);
        let acc = FedAvgAccumulator::new(spec.clone(), AccumulatorOptions::default());
        let mut out = vec![7u8; spec.byte_len()];
        assert!(!acc.finalize_into(&mut out));
        assert_eq!(out, vec![7u8; 8]);
    }
}
