//! Weighted FedAvg: a running weighted sum that updates are folded into one at a time, and a
//! finalize pass that divides by the total weight.
//!
//! Updates arrive as raw little-endian bytes (what the wire carries), so the kernels read bytes
//! directly instead of first converting to typed vectors: one pass over the update, one
//! read-modify-write pass over the sum. Large tensors are split across the rayon pool.
//!
//! Sums are `f32` for `F32`/`F16`/`BF16` models and `f64` for `F64` ones.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::model::{DType, ModelMismatch, ModelSpec};

/// Elements per parallel work item: large enough to amortise rayon's scheduling, small enough
/// to spread a 10 MB tensor over every core.
const PAR_CHUNK_ELEMENTS: usize = 1 << 16;

#[derive(Debug, Clone)]
enum TensorSum {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl TensorSum {
    fn zeroed(dtype: DType, len: usize) -> Self {
        match dtype {
            DType::F64 => TensorSum::F64(vec![0.0; len]),
            DType::F32 | DType::F16 | DType::BF16 => TensorSum::F32(vec![0.0; len]),
        }
    }
}

/// The weighted sum of the updates accepted so far in one round.
#[derive(Debug, Clone)]
pub struct FedAvgAccumulator {
    spec: ModelSpec,
    sums: Vec<TensorSum>,
    total_weight: f64,
    updates: usize,
}

impl FedAvgAccumulator {
    pub fn new(spec: ModelSpec) -> Self {
        let sums = spec
            .tensors
            .iter()
            .map(|t| TensorSum::zeroed(t.dtype, t.element_count()))
            .collect();
        Self {
            spec,
            sums,
            total_weight: 0.0,
            updates: 0,
        }
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn updates(&self) -> usize {
        self.updates
    }

    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// Adds `weight × update` to the sum. `data` holds the update's tensors back to back in the
    /// order of `update_spec`, which must match this model by names, dtypes and shapes (it may
    /// order the tensors differently). Nothing is added when the update does not match.
    pub fn add(
        &mut self,
        update_spec: &ModelSpec,
        data: &[u8],
        weight: f64,
    ) -> Result<(), ModelMismatch> {
        self.spec.check_update(update_spec)?;
        assert_eq!(
            data.len(),
            update_spec.byte_len(),
            "caller must pass exactly the update's bytes"
        );
        let mut offset = 0;
        for tensor in &update_spec.tensors {
            let bytes = &data[offset..offset + tensor.byte_len()];
            offset += tensor.byte_len();
            let index = self
                .spec
                .tensors
                .iter()
                .position(|t| t.name == tensor.name)
                .expect("check_update guarantees every update tensor is in the model");
            fold(&mut self.sums[index], tensor.dtype, bytes, weight);
        }
        self.total_weight += weight;
        self.updates += 1;
        Ok(())
    }

    /// Writes `sum / total_weight` into `out`, laid out in this model's tensor order and dtypes.
    /// Returns `false` (and leaves `out` untouched) when no update was added.
    pub fn finalize_into(&self, out: &mut [u8]) -> bool {
        assert_eq!(
            out.len(),
            self.spec.byte_len(),
            "output must hold the model"
        );
        if self.updates == 0 || self.total_weight <= 0.0 {
            return false;
        }
        let scale = 1.0 / self.total_weight;
        let mut offset = 0;
        for (tensor, sum) in self.spec.tensors.iter().zip(&self.sums) {
            let len = tensor.byte_len();
            write_scaled(sum, tensor.dtype, scale, &mut out[offset..offset + len]);
            offset += len;
        }
        true
    }
}

/// Whether every value in `bytes` (little-endian `dtype` elements) is finite.
pub fn all_finite(dtype: DType, bytes: &[u8]) -> bool {
    let size = dtype.size_bytes();
    let chunk_bytes = PAR_CHUNK_ELEMENTS * size;
    bytes
        .par_chunks(chunk_bytes)
        .all(|chunk| chunk.chunks_exact(size).all(|x| read(dtype, x).is_finite()))
}

fn fold(sum: &mut TensorSum, dtype: DType, bytes: &[u8], weight: f64) {
    let size = dtype.size_bytes();
    match sum {
        TensorSum::F32(acc) => {
            let w = weight as f32;
            acc.par_chunks_mut(PAR_CHUNK_ELEMENTS)
                .zip(bytes.par_chunks(PAR_CHUNK_ELEMENTS * size))
                .for_each(|(acc, bytes)| match dtype {
                    DType::F32 => fold_f32(acc, bytes, w),
                    _ => {
                        for (a, x) in acc.iter_mut().zip(bytes.chunks_exact(size)) {
                            *a += w * read(dtype, x) as f32;
                        }
                    }
                });
        }
        TensorSum::F64(acc) => {
            acc.par_chunks_mut(PAR_CHUNK_ELEMENTS)
                .zip(bytes.par_chunks(PAR_CHUNK_ELEMENTS * size))
                .for_each(|(acc, bytes)| {
                    for (a, x) in acc.iter_mut().zip(bytes.chunks_exact(size)) {
                        *a += weight * read(dtype, x);
                    }
                });
        }
    }
}

/// The hot loop for the common case, kept separate so that it vectorizes.
fn fold_f32(acc: &mut [f32], bytes: &[u8], w: f32) {
    for (a, x) in acc.iter_mut().zip(bytes.chunks_exact(4)) {
        *a += w * f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
    }
}

fn write_scaled(sum: &TensorSum, dtype: DType, scale: f64, out: &mut [u8]) {
    let size = dtype.size_bytes();
    match sum {
        TensorSum::F32(acc) => {
            let scale = scale as f32;
            acc.par_chunks(PAR_CHUNK_ELEMENTS)
                .zip(out.par_chunks_mut(PAR_CHUNK_ELEMENTS * size))
                .for_each(|(acc, out)| {
                    for (a, o) in acc.iter().zip(out.chunks_exact_mut(size)) {
                        write(dtype, (a * scale) as f64, o);
                    }
                });
        }
        TensorSum::F64(acc) => {
            acc.par_chunks(PAR_CHUNK_ELEMENTS)
                .zip(out.par_chunks_mut(PAR_CHUNK_ELEMENTS * size))
                .for_each(|(acc, out)| {
                    for (a, o) in acc.iter().zip(out.chunks_exact_mut(size)) {
                        write(dtype, a * scale, o);
                    }
                });
        }
    }
}

#[inline(always)]
fn read(dtype: DType, x: &[u8]) -> f64 {
    match dtype {
        DType::F32 => f32::from_le_bytes([x[0], x[1], x[2], x[3]]) as f64,
        DType::F64 => f64::from_le_bytes([x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]]),
        DType::F16 => f16::from_le_bytes([x[0], x[1]]).to_f64(),
        DType::BF16 => bf16::from_le_bytes([x[0], x[1]]).to_f64(),
    }
}

#[inline(always)]
fn write(dtype: DType, value: f64, out: &mut [u8]) {
    match dtype {
        DType::F32 => out.copy_from_slice(&(value as f32).to_le_bytes()),
        DType::F64 => out.copy_from_slice(&value.to_le_bytes()),
        DType::F16 => out.copy_from_slice(&f16::from_f64(value).to_le_bytes()),
        DType::BF16 => out.copy_from_slice(&bf16::from_f64(value).to_le_bytes()),
    }
}

/// Encodes `values` as little-endian `dtype` bytes (used by tests and by callers that build
/// models in memory).
pub fn encode_values(dtype: DType, values: &[f64]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * dtype.size_bytes()];
    for (v, o) in values.iter().zip(out.chunks_exact_mut(dtype.size_bytes())) {
        write(dtype, *v, o);
    }
    out
}

/// Decodes little-endian `dtype` bytes into `f64`s.
pub fn decode_values(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(dtype.size_bytes())
        .map(|x| read(dtype, x))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TensorSpec;

    fn one_tensor(dtype: DType, len: usize) -> ModelSpec {
        ModelSpec {
            tensors: vec![TensorSpec {
                name: "w".into(),
                dtype,
                shape: vec![len],
            }],
        }
    }

    #[test]
    fn weighted_average_of_three_updates() {
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            let spec = one_tensor(dtype, 3);
            let mut acc = FedAvgAccumulator::new(spec.clone());
            let updates = [([1.0, 2.0, -4.0], 1.0), ([3.0, 0.0, 4.0], 3.0)];
            for (values, weight) in updates {
                acc.add(&spec, &encode_values(dtype, &values), weight)
                    .unwrap();
            }
            let mut out = vec![0u8; spec.byte_len()];
            assert!(acc.finalize_into(&mut out));
            // (1·1 + 3·3)/4, (2·1 + 0·3)/4, (−4·1 + 4·3)/4: exact in every dtype.
            assert_eq!(decode_values(dtype, &out), vec![2.5, 0.5, 2.0], "{dtype}");
        }
    }

    #[test]
    fn large_tensor_is_folded_across_chunks() {
        let len = PAR_CHUNK_ELEMENTS * 3 + 17;
        let spec = one_tensor(DType::F32, len);
        let values: Vec<f64> = (0..len).map(|i| (i % 1000) as f64).collect();
        let mut acc = FedAvgAccumulator::new(spec.clone());
        acc.add(&spec, &encode_values(DType::F32, &values), 2.0)
            .unwrap();
        acc.add(&spec, &encode_values(DType::F32, &values), 6.0)
            .unwrap();
        let mut out = vec![0u8; spec.byte_len()];
        assert!(acc.finalize_into(&mut out));
        assert_eq!(decode_values(DType::F32, &out), values);
    }

    #[test]
    fn mismatched_update_adds_nothing() {
        let spec = one_tensor(DType::F32, 2);
        let mut acc = FedAvgAccumulator::new(spec.clone());
        acc.add(&spec, &encode_values(DType::F32, &[1.0, 1.0]), 1.0)
            .unwrap();
        let wrong = one_tensor(DType::F32, 3);
        assert!(
            acc.add(&wrong, &encode_values(DType::F32, &[9.0; 3]), 1.0)
                .is_err()
        );
        assert_eq!(acc.updates(), 1);
        let mut out = vec![0u8; spec.byte_len()];
        acc.finalize_into(&mut out);
        assert_eq!(decode_values(DType::F32, &out), vec![1.0, 1.0]);
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
        let mut acc = FedAvgAccumulator::new(global.clone());
        acc.add(
            &reordered,
            &encode_values(DType::F32, &[2.0, 3.0, 1.0]),
            1.0,
        )
        .unwrap();
        let mut out = vec![0u8; global.byte_len()];
        acc.finalize_into(&mut out);
        assert_eq!(decode_values(DType::F32, &out), vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn empty_round_has_no_result() {
        let spec = one_tensor(DType::F32, 2);
        let acc = FedAvgAccumulator::new(spec.clone());
        let mut out = vec![7u8; spec.byte_len()];
        assert!(!acc.finalize_into(&mut out));
        assert_eq!(out, vec![7u8; 8]);
    }

    #[test]
    fn non_finite_values_are_found() {
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            assert!(all_finite(dtype, &encode_values(dtype, &[0.0, -1.5, 3.0])));
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                assert!(
                    !all_finite(dtype, &encode_values(dtype, &[0.0, bad, 3.0])),
                    "{dtype} {bad}"
                );
            }
        }
    }
}
