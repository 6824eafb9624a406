//! The inner loops of aggregation, over raw little-endian bytes as they come off the wire.
//!
//! Averaging is bound by memory bandwidth, not arithmetic, so the loops are shaped for the
//! memory system: one streaming pass per input, the running sum touched as few times as
//! possible ([`fold_many`] folds several updates per pass over the sum, block by block, so the
//! sum's block stays in cache), work split over the rayon pool in large contiguous chunks. The
//! `f32` loops are written so that LLVM vectorizes them (`from_le_bytes` on `chunks_exact`
//! compiles to plain unaligned vector loads); `benches/kernels.rs` measures them against a
//! plain read of the same bytes.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::model::DType;

/// Elements of the running sum processed per block: 8 KiB of `f32`, which stays in L1
/// while every update of a [`fold_many`] pass is added into it.
pub const BLOCK: usize = 2 * 1024;

/// Elements per parallel work item: large enough to amortise scheduling, small enough to
/// spread a 10 MB tensor over every core.
pub const PAR_CHUNK: usize = 64 * BLOCK;

/// One update's contribution to a tensor: its bytes, their dtype and the FedAvg weight.
#[derive(Debug, Clone, Copy)]
pub struct Term<'a> {
    pub bytes: &'a [u8],
    pub dtype: DType,
    pub weight: f64,
}

#[inline(always)]
pub fn read(dtype: DType, x: &[u8]) -> f64 {
    match dtype {
        DType::F32 => f32::from_le_bytes([x[0], x[1], x[2], x[3]]) as f64,
        DType::F64 => f64::from_le_bytes([x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]]),
        DType::F16 => f16::from_le_bytes([x[0], x[1]]).to_f64(),
        DType::BF16 => bf16::from_le_bytes([x[0], x[1]]).to_f64(),
    }
}

#[inline(always)]
pub fn write(dtype: DType, value: f64, out: &mut [u8]) {
    match dtype {
        DType::F32 => out.copy_from_slice(&(value as f32).to_le_bytes()),
        DType::F64 => out.copy_from_slice(&value.to_le_bytes()),
        DType::F16 => out.copy_from_slice(&f16::from_f64(value).to_le_bytes()),
        DType::BF16 => out.copy_from_slice(&bf16::from_f64(value).to_le_bytes()),
    }
}

/// `acc[i] += w * x[i]` for `f32` sums, whatever the narrower-or-equal input dtype.
#[inline]
fn axpy_f32(acc: &mut [f32], x: &[u8], dtype: DType, w: f32) {
    match dtype {
        DType::F32 => {
            for (a, x) in acc.iter_mut().zip(x.chunks_exact(4)) {
                *a += w * f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
            }
        }
        DType::BF16 => {
            // bf16 is the top half of an f32: a shift, which vectorizes.
            for (a, x) in acc.iter_mut().zip(x.chunks_exact(2)) {
                let bits = u32::from(u16::from_le_bytes([x[0], x[1]])) << 16;
                *a += w * f32::from_bits(bits);
            }
        }
        DType::F16 => {
            // f16 → f32 is a table-free but branchy conversion in software; half converts
            // whole slices with the CPU's F16C instructions when it has them (checked at run
            // time), so convert a stack buffer at a time and add from there.
            const STEP: usize = 1024;
            let mut wide = [0f32; STEP];
            for (acc, x) in acc.chunks_mut(STEP).zip(x.chunks(2 * STEP)) {
                let wide = &mut wide[..acc.len()];
                match bytemuck::try_cast_slice::<u8, f16>(x) {
                    Ok(halves) if cfg!(target_endian = "little") => {
                        halves.convert_to_f32_slice(wide)
                    }
                    _ => {
                        for (v, x) in wide.iter_mut().zip(x.chunks_exact(2)) {
                            *v = f16::from_le_bytes([x[0], x[1]]).to_f32();
                        }
                    }
                }
                for (a, v) in acc.iter_mut().zip(wide.iter()) {
                    *a += w * v;
                }
            }
        }
        DType::F64 => {
            for (a, x) in acc.iter_mut().zip(x.chunks_exact(8)) {
                *a += (f64::from(w) * read(DType::F64, x)) as f32;
            }
        }
    }
}

#[inline]
fn axpy_f64(acc: &mut [f64], x: &[u8], dtype: DType, w: f64) {
    let size = dtype.size_bytes();
    for (a, x) in acc.iter_mut().zip(x.chunks_exact(size)) {
        *a += w * read(dtype, x);
    }
}

/// Adds every term into `acc` (an `f32` sum), in term order for each element, in one pass over
/// `acc`: block by block, each term's block is added while the sum's block is in cache.
/// Parallel over blocks; the per-element order never depends on the thread count.
pub fn fold_many_f32(acc: &mut [f32], terms: &[Term<'_>]) {
    if terms.len() > 1 && terms.iter().all(|t| t.dtype == DType::F32) {
        return fold_many_f32_registers(acc, terms);
    }
    fold_blocked(acc, terms, |acc, bytes, dtype, weight| {
        axpy_f32(acc, bytes, dtype, weight as f32)
    });
}

/// The blocked pass shared by the sums of every width: parallel over chunks of the sum, and
/// within a chunk, block by block, every term added while the sum's block is in cache.
fn fold_blocked<T: Send>(
    acc: &mut [T],
    terms: &[Term<'_>],
    axpy: impl Fn(&mut [T], &[u8], DType, f64) + Sync,
) {
    acc.par_chunks_mut(PAR_CHUNK)
        .enumerate()
        .for_each(|(chunk_index, acc)| {
            let chunk_start = chunk_index * PAR_CHUNK;
            for (block_index, acc) in acc.chunks_mut(BLOCK).enumerate() {
                let start = chunk_start + block_index * BLOCK;
                for term in terms {
                    let size = term.dtype.size_bytes();
                    let bytes = &term.bytes[start * size..(start + acc.len()) * size];
                    axpy(acc, bytes, term.dtype, term.weight);
                }
            }
        });
}

/// Elements of the sum held in registers while every term is added to them.
const LANES: usize = 16;

/// [`fold_many_f32`] for several `f32` terms: sixteen sums at a time stay in registers while
/// each term's next sixteen values are added, so the sum is read and written once per pass and
/// the terms stream in side by side, a cache line at a time.
fn fold_many_f32_registers(acc: &mut [f32], terms: &[Term<'_>]) {
    acc.par_chunks_mut(PAR_CHUNK)
        .enumerate()
        .for_each(|(chunk_index, acc)| {
            let start = chunk_index * PAR_CHUNK;
            let tail_start = start + acc.len() / LANES * LANES;
            let mut lanes = acc.chunks_exact_mut(LANES);
            for (group, sums) in (&mut lanes).enumerate() {
                let offset = (start + group * LANES) * 4;
                let mut v = [0f32; LANES];
                v.copy_from_slice(sums);
                for term in terms {
                    let w = term.weight as f32;
                    let x = &term.bytes[offset..offset + LANES * 4];
                    for (v, x) in v.iter_mut().zip(x.chunks_exact(4)) {
                        *v += w * f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
                    }
                }
                sums.copy_from_slice(&v);
            }
            let tail = lanes.into_remainder();
            if !tail.is_empty() {
                for term in terms {
                    let bytes = &term.bytes[tail_start * 4..(tail_start + tail.len()) * 4];
                    axpy_f32(tail, bytes, DType::F32, term.weight as f32);
                }
            }
        });
}

/// [`fold_many_f32`] for `f64` sums.
pub fn fold_many_f64(acc: &mut [f64], terms: &[Term<'_>]) {
    fold_blocked(acc, terms, axpy_f64);
}

/// Hogwild accumulation: adds one term into a shared `f32` sum without a lock. Each element is
/// a relaxed atomic load, add, store: no data race and no aliasing `&mut`, but two uploaders
/// adding to the same element at the same instant can lose one of the two additions — the
/// trade the Hogwild! paper makes for SGD, measured in `benches/kernels.rs`.
pub fn hogwild_add_f32(acc: &[AtomicU32], term: Term<'_>) {
    let size = term.dtype.size_bytes();
    let w = term.weight as f32;
    acc.par_chunks(PAR_CHUNK)
        .zip(term.bytes.par_chunks(PAR_CHUNK * size))
        .for_each(|(acc, bytes)| {
            for (a, x) in acc.iter().zip(bytes.chunks_exact(size)) {
                let value =
                    f32::from_bits(a.load(Ordering::Relaxed)) + w * read(term.dtype, x) as f32;
                a.store(value.to_bits(), Ordering::Relaxed);
            }
        });
}

/// [`hogwild_add_f32`] for `f64` sums.
pub fn hogwild_add_f64(acc: &[AtomicU64], term: Term<'_>) {
    let size = term.dtype.size_bytes();
    acc.par_chunks(PAR_CHUNK)
        .zip(term.bytes.par_chunks(PAR_CHUNK * size))
        .for_each(|(acc, bytes)| {
            for (a, x) in acc.iter().zip(bytes.chunks_exact(size)) {
                let value =
                    f64::from_bits(a.load(Ordering::Relaxed)) + term.weight * read(term.dtype, x);
                a.store(value.to_bits(), Ordering::Relaxed);
            }
        });
}

/// The bandwidth baseline: sums every `f32` of `bytes`, in parallel. Nothing can average bytes
/// faster than it can read them, so kernels are reported as a fraction of this.
pub fn read_sum_f32(bytes: &[u8]) -> f32 {
    bytes
        .par_chunks(PAR_CHUNK * 4)
        .map(|chunk| {
            // Independent lanes, as many as the fold keeps in registers, so that neither is
            // held back by one serial chain of additions.
            let mut lanes = [0f32; LANES];
            let mut groups = chunk.chunks_exact(LANES * 4);
            for group in &mut groups {
                for (lane, x) in lanes.iter_mut().zip(group.chunks_exact(4)) {
                    *lane += f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
                }
            }
            let tail: f32 = groups
                .remainder()
                .chunks_exact(4)
                .map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]]))
                .sum();
            lanes.iter().sum::<f32>() + tail
        })
        .sum()
}

/// Whether every value in `bytes` (little-endian `dtype` elements) is finite.
pub fn all_finite(dtype: DType, bytes: &[u8]) -> bool {
    let size = dtype.size_bytes();
    let check = |chunk: &[u8]| match dtype {
        // An f32 is finite unless its exponent bits are all ones.
        DType::F32 => chunk.chunks_exact(4).fold(true, |ok, x| {
            ok & (u32::from_le_bytes([x[0], x[1], x[2], x[3]]) & 0x7f80_0000 != 0x7f80_0000)
        }),
        _ => chunk.chunks_exact(size).all(|x| read(dtype, x).is_finite()),
    };
    // Uploads are checked piece by piece as they arrive, from the async runtime's threads:
    // handing each piece of a few hundred kilobytes to the rayon pool and blocking until it is
    // done cost more in thread hand-offs than the check itself.
    if bytes.len() <= 4 * PAR_CHUNK * size {
        return check(bytes);
    }
    bytes.par_chunks(PAR_CHUNK * size).all(check)
}

/// Writes `value(sum[i]) * scale` into `out` as `dtype` (the finalize pass), whatever the
/// sum's element type.
fn write_scaled<T: Sync>(
    sum: &[T],
    dtype: DType,
    scale: f64,
    out: &mut [u8],
    value: impl Fn(&T) -> f64 + Sync,
) {
    let size = dtype.size_bytes();
    sum.par_chunks(PAR_CHUNK)
        .zip(out.par_chunks_mut(PAR_CHUNK * size))
        .for_each(|(sum, out)| {
            for (a, o) in sum.iter().zip(out.chunks_exact_mut(size)) {
                write(dtype, value(a) * scale, o);
            }
        });
}

/// Writes `sum[i] * scale` into `out` as `dtype` (the finalize pass).
pub fn write_scaled_f32(sum: &[f32], dtype: DType, scale: f64, out: &mut [u8]) {
    if dtype != DType::F32 {
        return write_scaled(sum, dtype, scale, out, |a| f64::from(*a));
    }
    let scale = scale as f32;
    sum.par_chunks(PAR_CHUNK)
        .zip(out.par_chunks_mut(PAR_CHUNK * 4))
        .for_each(|(sum, out)| {
            for (a, o) in sum.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&(a * scale).to_le_bytes());
            }
        });
}

/// [`write_scaled_f32`] for `f64` sums.
pub fn write_scaled_f64(sum: &[f64], dtype: DType, scale: f64, out: &mut [u8]) {
    write_scaled(sum, dtype, scale, out, |a| *a);
}

/// [`write_scaled_f32`] straight from a Hogwild sum.
pub fn write_scaled_atomic_f32(sum: &[AtomicU32], dtype: DType, scale: f64, out: &mut [u8]) {
    write_scaled(sum, dtype, scale, out, |a| {
        f64::from(f32::from_bits(a.load(Ordering::Relaxed)))
    });
}

/// [`write_scaled_f64`] straight from a Hogwild sum.
pub fn write_scaled_atomic_f64(sum: &[AtomicU64], dtype: DType, scale: f64, out: &mut [u8]) {
    write_scaled(sum, dtype, scale, out, |a| {
        f64::from_bits(a.load(Ordering::Relaxed))
    });
}

/// A float the finalize pass can scale and check.
pub trait SumValue: Copy + Send + Sync + std::ops::MulAssign {
    fn finite(self) -> bool;
}

impl SumValue for f32 {
    #[inline(always)]
    fn finite(self) -> bool {
        self.is_finite()
    }
}

impl SumValue for f64 {
    #[inline(always)]
    fn finite(self) -> bool {
        self.is_finite()
    }
}

/// `sum[i] *= scale` in place (finalize of a sum that becomes the model file), and whether
/// every result is finite: checked in the same pass, so that the check that no non-finite
/// model is published costs no second read of the model.
pub fn scale_in_place<T: SumValue>(sum: &mut [T], scale: T) -> bool {
    sum.par_chunks_mut(PAR_CHUNK)
        .map(|sum| {
            let mut finite = true;
            for a in sum {
                *a *= scale;
                finite &= a.finite();
            }
            finite
        })
        .reduce(|| true, |a, b| a & b)
}

/// Encodes `values` as little-endian `dtype` bytes.
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

    #[test]
    fn fold_many_matches_one_by_one_bit_for_bit() {
        let len = PAR_CHUNK * 2 + BLOCK + 5;
        let inputs: Vec<Vec<u8>> = (0..3)
            .map(|k| {
                let values: Vec<f64> = (0..len)
                    .map(|i| ((i * 7 + k * 13) % 101) as f64 * 0.37)
                    .collect();
                encode_values(DType::F32, &values)
            })
            .collect();
        let terms: Vec<Term> = inputs
            .iter()
            .zip([1.0, 2.5, 7.0])
            .map(|(bytes, weight)| Term {
                bytes,
                dtype: DType::F32,
                weight,
            })
            .collect();
        let mut blocked = vec![0f32; len];
        fold_many_f32(&mut blocked, &terms);
        let mut serial = vec![0f32; len];
        for term in &terms {
            fold_many_f32(&mut serial, std::slice::from_ref(term));
        }
        assert_eq!(blocked, serial);
        let atomic: Vec<AtomicU32> = (0..len).map(|_| AtomicU32::new(0)).collect();
        for term in &terms {
            hogwild_add_f32(&atomic, *term);
        }
        let hogwild: Vec<f32> = atomic
            .iter()
            .map(|a| f32::from_bits(a.load(Ordering::Relaxed)))
            .collect();
        assert_eq!(hogwild, serial, "one uploader at a time loses nothing");
    }

    #[test]
    fn half_precision_inputs_accumulate_in_f32() {
        for dtype in [DType::F16, DType::BF16] {
            let bytes = encode_values(dtype, &[0.5, -2.0, 3.0]);
            let mut acc = vec![0f32; 3];
            fold_many_f32(
                &mut acc,
                &[Term {
                    bytes: &bytes,
                    dtype,
                    weight: 3.0,
                }],
            );
            assert_eq!(acc, vec![1.5, -6.0, 9.0], "{dtype}");
        }
    }

    #[test]
    fn read_sum_reads_everything() {
        let values: Vec<f64> = (0..(PAR_CHUNK + 19)).map(|i| (i % 4) as f64).collect();
        let bytes = encode_values(DType::F32, &values);
        assert_eq!(read_sum_f32(&bytes), values.iter().sum::<f64>() as f32);
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
