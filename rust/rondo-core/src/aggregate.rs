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
//! For the common case of a model whose tensors are all `F32` (or all `F64`), the sums live in
//! one buffer laid out exactly like the model file's data section, after room for its header:
//! finalize scales them in place and the buffer *becomes* the next model file
//! ([`FedAvgAccumulator::finalize`]), with no allocation and no copy on the critical path.
//!
//! With `deterministic`, updates are held until finalize and folded in the order of their keys
//! (participant ids), so the result is bit-for-bit the same whatever the arrival order. That
//! holds every update in memory until the round closes: opt in only where reproducibility is
//! worth O(participants × model) memory.

use parking_lot::{Mutex, MutexGuard};
use std::sync::atomic::{AtomicU32, AtomicU64};

use bytes::Bytes;
use rayon::prelude::*;
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
    /// `Bytes`, so that the caller decides what dropping them does: a plain allocation is
    /// freed, a caller's pooled buffer (`Bytes::from_owner`) can go back to its pool from
    /// whichever thread folds the update.
    pub data: Bytes,
    pub weight: f64,
    /// The participant's reported metrics (`rondo.metrics`), for rules that use them (a
    /// Python plug-in sees them); the native rules ignore them.
    pub metrics: std::collections::BTreeMap<String, f64>,
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

/// Sums of a uniform `F32` or `F64` model, in place in a future model file: `prefix` bytes
/// reserved for the file's header, then each tensor's sums where its bytes will be. `u64`
/// words keep every sum aligned.
#[derive(Debug)]
struct InPlaceSum {
    words: Vec<u64>,
    prefix: usize,
    dtype: DType,
    /// Element range of each tensor within the data section.
    ranges: Vec<std::ops::Range<usize>>,
}

/// A locked plain or in-place sum.
enum SumGuard<'a> {
    InPlace(MutexGuard<'a, InPlaceSum>),
    Plain(MutexGuard<'a, Vec<PlainSum>>),
}

#[derive(Debug)]
enum Sums {
    InPlace(Mutex<InPlaceSum>),
    Plain(Mutex<Vec<PlainSum>>),
    Atomic(Vec<AtomicSum>),
}

/// A finished model file: `len` bytes, the first `prefix` of them left for the caller's
/// header. Owns its memory, so it can back a shared `bytes::Bytes` without a copy.
#[derive(Debug)]
pub struct ModelBuffer {
    words: Vec<u64>,
    len: usize,
    prefix: usize,
}

impl ModelBuffer {
    /// A zeroed buffer whose pages are mapped in as they are first written: for one that is
    /// about to be filled anyway (a model read from a file).
    pub fn new(prefix: usize, data_len: usize) -> Self {
        let len = prefix + data_len;
        let mut words = vec![0u64; len.div_ceil(8)];
        crate::memory::advise_huge_pages(&mut words);
        Self { words, len, prefix }
    }

    /// A buffer for a model of `data_len` bytes that the caller fills in whole (data and
    /// header), in `spare` (the memory of an earlier model, see [`ModelBuffer::into_words`],
    /// already mapped) when it has exactly the right size, else in a fresh [`ModelBuffer::new`].
    /// Its bytes are whatever `spare` held: nothing is zeroed.
    pub fn reusing(prefix: usize, data_len: usize, spare: Option<Vec<u64>>) -> Self {
        let len = prefix + data_len;
        match spare {
            Some(words) if words.len() == len.div_ceil(8) => Self { words, len, prefix },
            _ => Self::new(prefix, data_len),
        }
    }

    /// A zeroed buffer whose pages are already mapped.
    pub fn zeroed(prefix: usize, data_len: usize) -> Self {
        let len = prefix + data_len;
        Self {
            words: touched_zeros(len.div_ceil(8)),
            len,
            prefix,
        }
    }

    /// The room reserved for the header.
    pub fn prefix_mut(&mut self) -> &mut [u8] {
        let prefix = self.prefix;
        &mut bytemuck::cast_slice_mut::<u64, u8>(&mut self.words)[..prefix]
    }

    /// The buffer's memory, for the sums of a later round
    /// ([`FedAvgAccumulator::with_prefix_reusing`]).
    pub fn into_words(self) -> Vec<u64> {
        self.words
    }

    /// The model's tensor bytes.
    pub fn data(&self) -> &[u8] {
        &self.as_ref()[self.prefix..]
    }

    /// The model's tensor bytes, to fill in.
    pub fn data_mut(&mut self) -> &mut [u8] {
        let (prefix, len) = (self.prefix, self.len);
        &mut bytemuck::cast_slice_mut::<u64, u8>(&mut self.words)[prefix..len]
    }
}

impl AsRef<[u8]> for ModelBuffer {
    fn as_ref(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.words)[..self.len]
    }
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
    prefix: usize,
    sums: Sums,
    /// Blocked mode: updates waiting for the next fold pass. Deterministic mode: every update
    /// of the round, folded at finalize.
    queue: Mutex<Vec<Update>>,
    totals: Mutex<Totals>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock()
}

/// A zeroed vector whose pages are already mapped. A fresh allocation is mapped lazily, page by
/// page, on first write; for a large sum that costs more than the fold itself, so it is paid
/// here, in parallel, when the accumulator is created rather than by the first upload.
fn touched_zeros<T: Default + Clone + Copy + Send + Sync>(len: usize) -> Vec<T> {
    let mut values = vec![T::default(); len];
    crate::memory::advise_huge_pages(&mut values);
    values
        .par_chunks_mut(kernels::PAR_CHUNK)
        .for_each(|chunk| chunk.fill(T::default()));
    values
}

/// Frees large folded updates on a thread of their own: unmapping a buffer of many megabytes
/// takes milliseconds that the upload's answer (and the round's close) need not wait for, and
/// on the rayon pool it would hold up the next fold or finalize. Small ones are freed at once,
/// so that memory is back before the next upload is staged. (When the bytes belong to a
/// caller's buffer pool, dropping them only hands the buffer back; for a large batch the
/// thread start is then wasted, but it is small next to folding 64 MB.)
fn release_in_background(updates: Vec<Update>) {
    let bytes = updates.iter().map(|u| u.data.len()).sum();
    crate::memory::drop_large(updates, bytes);
}

fn sum_is_f64(dtype: DType) -> bool {
    dtype == DType::F64
}

impl FedAvgAccumulator {
    pub fn new(spec: ModelSpec, options: AccumulatorOptions) -> Self {
        Self::with_prefix(spec, options, 0)
    }

    /// An accumulator whose [`finalize`](Self::finalize) leaves `prefix` bytes (a multiple of
    /// 8) before the model's data, for the caller's file header.
    pub fn with_prefix(spec: ModelSpec, options: AccumulatorOptions, prefix: usize) -> Self {
        Self::with_prefix_reusing(spec, options, prefix, None)
    }

    /// Like [`with_prefix`](Self::with_prefix), but the sums are built in `spare` (the memory of
    /// a finished model, see [`ModelBuffer::into_words`]) when it has exactly the size they
    /// need, which it then zeroes. Memory already mapped is zeroed several times faster than
    /// fresh memory is mapped in, and that happens between two rounds, while participants
    /// wait. Otherwise `spare` is simply dropped.
    pub fn with_prefix_reusing(
        spec: ModelSpec,
        options: AccumulatorOptions,
        prefix: usize,
        spare: Option<Vec<u64>>,
    ) -> Self {
        assert_eq!(prefix % 8, 0, "the prefix keeps the sums 8-byte aligned");
        let uniform = spec.tensors.first().map(|t| t.dtype).filter(|d| {
            matches!(d, DType::F32 | DType::F64) && spec.tensors.iter().all(|t| t.dtype == *d)
        });
        let lock_free = options.mode == AccumulationMode::Hogwild && !options.deterministic;
        let sums = match uniform {
            // In place reinterprets the sums as little-endian bytes.
            Some(dtype) if cfg!(target_endian = "little") && !lock_free => {
                let mut start = 0;
                let ranges = spec
                    .tensors
                    .iter()
                    .map(|t| {
                        let range = start..start + t.element_count();
                        start = range.end;
                        range
                    })
                    .collect();
                let words = match spare {
                    Some(mut words) if words.len() == (prefix + spec.byte_len()).div_ceil(8) => {
                        words
                            .par_chunks_mut(kernels::PAR_CHUNK)
                            .for_each(|chunk| chunk.fill(0));
                        words
                    }
                    _ => ModelBuffer::zeroed(prefix, spec.byte_len()).words,
                };
                Sums::InPlace(Mutex::new(InPlaceSum {
                    words,
                    prefix,
                    dtype,
                    ranges,
                }))
            }
            _ => Self::separate_sums(&spec, options),
        };
        Self {
            spec,
            options,
            prefix,
            sums,
            queue: Mutex::new(Vec::new()),
            totals: Mutex::new(Totals::default()),
        }
    }

    fn separate_sums(spec: &ModelSpec, options: AccumulatorOptions) -> Sums {
        match options.mode {
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
                            PlainSum::F64(touched_zeros(n))
                        } else {
                            PlainSum::F32(touched_zeros(n))
                        }
                    })
                    .collect(),
            )),
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
                (_, AccumulationMode::Locked) => {
                    self.fold(&mut self.lock_sum(), std::slice::from_ref(&update));
                }
                _ => {
                    lock(&self.queue).push(update);
                    // Whoever gets the sum folds everything queued by then, ours included
                    // (or a previous holder already folded ours: the queue is then empty).
                    let mut sum = self.lock_sum();
                    let batch = std::mem::take(&mut *lock(&self.queue));
                    self.fold(&mut sum, &batch);
                    drop(sum);
                    release_in_background(batch);
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

    /// Takes the lock of a plain or in-place sum (Hogwild sums have none).
    fn lock_sum(&self) -> SumGuard<'_> {
        match &self.sums {
            Sums::InPlace(sum) => SumGuard::InPlace(lock(sum)),
            Sums::Plain(sums) => SumGuard::Plain(lock(sums)),
            Sums::Atomic(_) => unreachable!("hogwild sums are folded without a lock"),
        }
    }

    fn fold(&self, sum: &mut SumGuard<'_>, updates: &[Update]) {
        match sum {
            SumGuard::InPlace(sum) => self.fold_in_place(sum, updates),
            SumGuard::Plain(sums) => self.fold_plain(sums, updates),
        }
    }

    fn fold_in_place(&self, sum: &mut InPlaceSum, updates: &[Update]) {
        if updates.is_empty() {
            return;
        }
        let prefix = sum.prefix;
        let bytes = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut sum.words)[prefix..];
        for (index, range) in sum.ranges.iter().enumerate() {
            let terms = self.terms(index, updates);
            match sum.dtype {
                DType::F64 => {
                    let acc: &mut [f64] =
                        bytemuck::cast_slice_mut(&mut bytes[range.start * 8..range.end * 8]);
                    kernels::fold_many_f64(acc, &terms);
                }
                _ => {
                    let acc: &mut [f32] =
                        bytemuck::cast_slice_mut(&mut bytes[range.start * 4..range.end * 4]);
                    kernels::fold_many_f32(acc, &terms);
                }
            }
        }
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

    /// Turns the sum into the next model: `sum / total_weight`, in the model's tensor order and
    /// dtypes, after [`with_prefix`](Self::with_prefix)'s reserved bytes. `None` when no update
    /// was added. In-place sums are scaled where they are and handed over without a copy.
    pub fn finalize(self) -> Option<ModelBuffer> {
        self.finalize_checked().map(|(buffer, _)| buffer)
    }

    /// [`finalize`](Self::finalize), and whether every value of the model is finite (checked
    /// while it is written, not in a second pass).
    pub fn finalize_checked(self) -> Option<(ModelBuffer, bool)> {
        let total_weight = self.total_weight();
        if self.updates() == 0 || total_weight <= 0.0 {
            return None;
        }
        if self.options.deterministic {
            let mut held = std::mem::take(&mut *lock(&self.queue));
            held.sort_by(|a, b| a.key.cmp(&b.key));
            self.fold(&mut self.lock_sum(), &held);
        }
        let scale = 1.0 / total_weight;
        let prefix = self.prefix;
        let data_len = self.spec.byte_len();
        match self.sums {
            Sums::InPlace(sum) => {
                let sum = sum.into_inner();
                let mut buffer = ModelBuffer {
                    len: prefix + data_len,
                    words: sum.words,
                    prefix,
                };
                let data = buffer.data_mut();
                let finite = match sum.dtype {
                    DType::F64 => kernels::scale_in_place(bytemuck::cast_slice_mut(data), scale),
                    _ => kernels::scale_in_place(bytemuck::cast_slice_mut(data), scale as f32),
                };
                Some((buffer, finite))
            }
            Sums::Plain(ref sums) => {
                let sums = lock(sums);
                let buffer = self.write_tensors(|index, dtype, out| match &sums[index] {
                    PlainSum::F32(acc) => kernels::write_scaled_f32(acc, dtype, scale, out),
                    PlainSum::F64(acc) => kernels::write_scaled_f64(acc, dtype, scale, out),
                });
                let finite = crate::strategy::model_is_finite(&self.spec, buffer.data());
                Some((buffer, finite))
            }
            Sums::Atomic(ref sums) => {
                let buffer = self.write_tensors(|index, dtype, out| match &sums[index] {
                    AtomicSum::F32(acc) => kernels::write_scaled_atomic_f32(acc, dtype, scale, out),
                    AtomicSum::F64(acc) => kernels::write_scaled_atomic_f64(acc, dtype, scale, out),
                });
                let finite = crate::strategy::model_is_finite(&self.spec, buffer.data());
                Some((buffer, finite))
            }
        }
    }

    /// A new model buffer whose tensors `write(index, dtype, bytes)` fills one by one.
    fn write_tensors(&self, write: impl Fn(usize, DType, &mut [u8])) -> ModelBuffer {
        let mut buffer = ModelBuffer::zeroed(self.prefix, self.spec.byte_len());
        let mut out = buffer.data_mut();
        for (index, tensor) in self.spec.tensors.iter().enumerate() {
            let (here, rest) = out.split_at_mut(tensor.byte_len());
            write(index, tensor.dtype, here);
            out = rest;
        }
        buffer
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
            data: encode_values(dtype, values).into(),
            weight,
            metrics: Default::default(),
        }
    }

    fn finalize(acc: FedAvgAccumulator) -> Vec<f64> {
        let dtype = acc.spec().tensors[0].dtype;
        let buffer = acc.finalize().expect("updates were added");
        decode_values(dtype, buffer.data())
    }

    #[test]
    fn a_finished_model_becomes_the_next_sum_zeroed() {
        let spec = one_tensor(DType::F32, 3);
        let first = FedAvgAccumulator::with_prefix(spec.clone(), AccumulatorOptions::default(), 8);
        first
            .add(update(&spec, DType::F32, &[1.0, 2.0, 3.0], 1.0))
            .expect("fits");
        let words = first.finalize().expect("updates were added").into_words();
        let address = words.as_ptr();

        let next = FedAvgAccumulator::with_prefix_reusing(
            spec.clone(),
            AccumulatorOptions::default(),
            8,
            Some(words),
        );
        next.add(update(&spec, DType::F32, &[4.0, 4.0, 4.0], 2.0))
            .expect("fits");
        let buffer = next.finalize().expect("updates were added");
        assert_eq!(
            decode_values(DType::F32, buffer.data()),
            vec![4.0, 4.0, 4.0]
        );
        let words = buffer.into_words();
        assert_eq!(words.as_ptr(), address, "the same memory, zeroed first");

        // Memory of another size is not used.
        let other = FedAvgAccumulator::with_prefix_reusing(
            spec.clone(),
            AccumulatorOptions::default(),
            16,
            Some(vec![7; 3]),
        );
        other
            .add(update(&spec, DType::F32, &[1.0, 1.0, 1.0], 1.0))
            .expect("fits");
        assert_eq!(finalize(other), vec![1.0, 1.0, 1.0]);
    }

    #[test]
    fn a_buffer_reuses_spare_memory_of_exactly_its_size() {
        let spare = ModelBuffer::zeroed(16, 100).into_words();
        let address = spare.as_ptr();
        let reused = ModelBuffer::reusing(16, 100, Some(spare));
        assert_eq!(reused.as_ref().as_ptr(), address.cast());
        assert_eq!((reused.as_ref().len(), reused.data().len()), (116, 100));
        let other = ModelBuffer::zeroed(16, 200).into_words();
        let fresh = ModelBuffer::reusing(16, 100, Some(other));
        assert_eq!(fresh.data().len(), 100);
        assert_eq!(ModelBuffer::reusing(8, 3, None).as_ref().len(), 11);
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
                    assert_eq!(finalize(acc), vec![2.5, 0.5, 2.0], "{dtype} {mode:?}");
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
            assert!(finalize(acc).iter().all(|v| *v == 3.5), "{mode:?}");
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
            acc.finalize().unwrap().data().to_vec()
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
        assert_eq!(finalize(acc), vec![1.0, 1.0]);
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
            data: encode_values(DType::F32, &[2.0, 3.0, 1.0]).into(),
            weight: 1.0,
            metrics: Default::default(),
        })
        .unwrap();
        assert_eq!(finalize(acc), vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn empty_round_has_no_result() {
        let spec = one_tensor(DType::F32, 2);
        let acc = FedAvgAccumulator::new(spec.clone(), AccumulatorOptions::default());
        assert!(acc.finalize().is_none());
    }

    #[test]
    fn prefix_is_left_for_the_header_in_every_layout() {
        let mixed = ModelSpec {
            tensors: vec![
                TensorSpec {
                    name: "a".into(),
                    dtype: DType::F16,
                    shape: vec![3],
                },
                TensorSpec {
                    name: "b".into(),
                    dtype: DType::F32,
                    shape: vec![2],
                },
            ],
        };
        let uniform = one_tensor(DType::F32, 5);
        for spec in [mixed, uniform] {
            for mode in MODES {
                let acc = FedAvgAccumulator::with_prefix(
                    spec.clone(),
                    AccumulatorOptions {
                        mode,
                        deterministic: false,
                    },
                    16,
                );
                let data: Vec<f64> = (0..spec.element_count()).map(|i| i as f64).collect();
                let mut bytes = Vec::new();
                let mut start = 0;
                for t in &spec.tensors {
                    bytes.extend(encode_values(
                        t.dtype,
                        &data[start..start + t.element_count()],
                    ));
                    start += t.element_count();
                }
                acc.add(Update {
                    key: "p".into(),
                    spec: spec.clone(),
                    data: Bytes::copy_from_slice(&bytes),
                    weight: 2.0,
                    metrics: Default::default(),
                })
                .unwrap();
                let mut buffer = acc.finalize().unwrap();
                buffer.prefix_mut().copy_from_slice(&[9u8; 16]);
                assert_eq!(&buffer.as_ref()[..16], &[9u8; 16]);
                assert_eq!(buffer.data(), &bytes[..], "{mode:?}");
            }
        }
    }
}
