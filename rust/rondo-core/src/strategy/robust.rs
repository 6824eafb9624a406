//! Byzantine-robust rules that aggregate a whole round at once: each needs every update of the
//! round before it can decide, so a few faulty or malicious participants cannot drag the model
//! the way a single huge update drags a weighted mean.
//!
//! - [`Median`] (Yin et al. 2018): the coordinate-wise median.
//! - [`TrimmedMean`] (Yin et al. 2018): per coordinate, the mean after dropping the `beta`
//!   fraction of lowest and of highest values.
//! - [`Krum`] (Blanchard et al. 2017): the one update closest to its `n - f - 2` nearest others.
//! - [`MultiKrum`] (Blanchard et al. 2017): the mean of the `m` updates with the best Krum scores.
//! - [`Bulyan`] (El Mhamdi et al. 2018): Krum applied repeatedly to pick `n - 2f` updates, then
//!   per coordinate the mean of the `n - 4f` picked values closest to their median.
//!
//! Choices common to all of them:
//!
//! - **Unweighted**, as in the papers: the sample counts participants report
//!   ([`Update::weight`]) are ignored, since a Byzantine participant would simply report a huge
//!   one. Metrics are ignored too.
//! - **Independent of arrival order**: updates are put in the order of their keys (participant
//!   ids, unique within a round) before anything is computed, so every tie-break ("the lowest
//!   key") and every summation order is fixed by the updates themselves; the split of the
//!   distance sums over threads is fixed by the model's size and `n`, never by the thread count.
//! - **Precision**: values are decoded to `f32` (exact for `F32`, `F16`, `BF16`) or to `f64` for
//!   `F64` tensors; medians, sums, means and squared distances are computed in `f64`, and each
//!   result is rounded once, to its tensor's own dtype. A result that is not finite (only an
//!   `F64` mean of values near `f64::MAX` can overflow) fails the round with [`NOT_FINITE`].
//! - **The previous model is not used**: each round's model is made from its updates alone.
//!
//! **Memory.** These rules hold every update of the round until it closes: `n × model`, the
//! uploads' own buffers (`Bytes`, never copied), which is why [`Strategy::holds_updates`] is
//! `true` and the aggregator's memory is no longer bounded by the model alone. Finalize adds the
//! next model (`1 × model`) and a bounded working set: the model is processed in column blocks
//! of `B = clamp(65536 / n, 256, 4096)` coordinates across all `n` updates, and each worker
//! thread holds one block of `n × B` decoded values (at most 256 KiB of `f32` or 512 KiB of
//! `f64` for `n ≤ 256`, `n × 1 KiB` or `n × 2 KiB` beyond) and three rows of `B` `f64`
//! results (96 KiB at most). The output's blocks are listed for the pool at 40 bytes each
//! (under 0.5% of the model while `B = 4096`, i.e. `n ≤ 16`; 8% at worst, `F16` with
//! `n > 256`). The Krum family also keeps the `n × n` squared-distance matrix and at most 64
//! partial ones being summed, 16 MiB together at most (fewer partials when `n` is large), and
//! `O(n)` scores.
//!
//! The work is tiled for the cache and spread over the rayon pool. Coordinate-wise rules run in
//! parallel over the output's blocks; for up to 64 updates each block's columns are sorted by
//! a sorting network (Batcher's odd-even merge sort) applied to whole rows, whose
//! compare-exchanges vectorize across coordinates, and the median, the trimmed sum and
//! Bulyan's window are then read off the sorted rows; beyond 64, each column is reduced on its
//! own, with `select_nth_unstable_by` where a selection is enough. The distance matrix is summed
//! over the same blocks in fixed stripes, in parallel, each stripe into its own partial
//! matrix, reduced in stripe order. `F32` (and `F64`) updates aligned in memory are read in
//! place, without decoding.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;

use half::f16;
use half::slice::HalfFloatSliceExt;
use parking_lot::Mutex;
use rayon::prelude::*;

use super::{Finalized, NOT_FINITE, OptionError, Options, RoundAggregation, RoundStart, Strategy};
use crate::aggregate::{ModelBuffer, Update};
use crate::kernels;
use crate::model::{DType, ModelMismatch, ModelSpec};

/// The largest `f` or `m` a config may give: far beyond any round these rules can aggregate
/// (they are `O(n² × model)`), small enough that no bound computed from it overflows.
const MAX_COUNT: u64 = 100_000;

/// Values of one block across all rows that a worker decodes at a time: 256 KiB of `f32`, which
/// stays in L2 while the block's coordinates (or its pairs of rows) are worked through.
const WORKING_VALUES: usize = 64 * 1024;

/// Bounds on a block's coordinates: long enough to stream each row's block and amortise the
/// per-block bookkeeping, short enough to spread a model over every core.
const MIN_BLOCK: usize = 256;
const MAX_BLOCK: usize = 4096;

/// The most partial distance matrices summed in parallel, and the most memory they may take.
const STRIPES: usize = 64;
const PARTIALS_BYTES: usize = 16 << 20;

/// Coordinate-wise median (Yin et al. 2018), unweighted: for each coordinate, the median of
/// the `n` updates' values; for even `n`, the mean of the two middle values. Takes no options;
/// any `n ≥ 1`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Median;

/// Coordinate-wise trimmed mean (Yin et al. 2018), unweighted. Option `beta` (default 0.1,
/// `0 ≤ beta < 0.5`): the fraction trimmed from *each* end. For each coordinate, the
/// `k = floor(beta × n)` lowest and `k` highest of the `n` values are dropped and the remaining
/// `n - 2k` (at least one, since `beta < 0.5`) are averaged. `floor` means that small rounds
/// trim nothing: with the default, fewer than 10 updates are simply averaged. Any `n ≥ 1`.
#[derive(Debug, Clone, Copy)]
pub struct TrimmedMean {
    beta: f64,
}

/// Krum (Blanchard et al. 2017), unweighted. Option `f` (default 1, a whole number): the number
/// of Byzantine updates assumed. Each update's score is the sum of its squared Euclidean
/// distances (over the whole model, every tensor) to its `n - f - 2` nearest other updates; the
/// update with the lowest score becomes the model, unchanged. Ties go to the lowest key
/// (participant id). Needs `n > 2f + 2`; a smaller round fails with that reason.
#[derive(Debug, Clone, Copy)]
pub struct Krum {
    f: usize,
}

/// Multi-Krum (Blanchard et al. 2017), unweighted. Options `f` (default 1) as for [`Krum`], and
/// `m` (a whole number ≥ 1; default `n - f` for each round): Krum's scores are computed once,
/// on all `n` updates, and the `m` updates with the lowest scores (ties to the lowest key) are
/// averaged coordinate-wise, each counting once. Needs `n > 2f + 2` and `m ≤ n - f`; a round
/// that breaks either fails with the numbers.
#[derive(Debug, Clone, Copy)]
pub struct MultiKrum {
    f: usize,
    m: Option<usize>,
}

/// Bulyan (El Mhamdi et al. 2018) over Krum, unweighted. Option `f` (default 1). Needs
/// `n ≥ 4f + 3`; a smaller round fails with that reason.
///
/// Selection: `θ = n - 2f` updates, one at a time: each time, the update with the best Krum
/// score *within the updates not yet selected* moves to the selection (scores recomputed on
/// that remaining set with the same `f`, from the one distance matrix of the round; ties to the
/// lowest key). On a remaining set of `r` updates a score sums the `r - f - 2` nearest
/// distances, but at least 1 and at most `r - 1`: the paper's bound leaves `r - f - 2 = 0`
/// at the last step when `f = 1`, where every score would be 0 (Flower clamps the same way).
///
/// Aggregation: per coordinate, the `β = θ - 2f` selected values closest to the median of the
/// `θ` selected values (for even `θ`, the mean of the two middle ones) are averaged. When two
/// values are equally far from the median and only one can be taken, the lower one is.
#[derive(Debug, Clone, Copy)]
pub struct Bulyan {
    f: usize,
}

impl Median {
    /// Takes no options: any given is refused by [`super::build`] when it finishes them.
    pub fn from_options(_options: &mut Options) -> Result<Self, OptionError> {
        Ok(Self)
    }
}

impl TrimmedMean {
    pub fn from_options(options: &mut Options) -> Result<Self, OptionError> {
        const RULE: &str = "must be a finite number from 0 up to, but not including, 0.5";
        // `number` bounds inclusively; 0.5 would trim everything from an even round.
        match options.number("beta", 0.1, 0.0, 0.5) {
            Ok(beta) if beta < 0.5 => Ok(Self { beta }),
            Ok(beta) => Err(OptionError::new("beta", Some(beta), RULE)),
            Err(error) => Err(OptionError {
                rule: RULE.into(),
                ..error
            }),
        }
    }

    /// The fraction trimmed from each end.
    pub fn beta(&self) -> f64 {
        self.beta
    }
}

/// Option `f` of the Krum family.
fn byzantine(options: &mut Options) -> Result<usize, OptionError> {
    Ok(options.count("f", Some(1), 0, MAX_COUNT)?.unwrap_or(1) as usize)
}

impl Krum {
    pub fn from_options(options: &mut Options) -> Result<Self, OptionError> {
        Ok(Self {
            f: byzantine(options)?,
        })
    }

    pub fn f(&self) -> usize {
        self.f
    }
}

impl MultiKrum {
    pub fn from_options(options: &mut Options) -> Result<Self, OptionError> {
        let f = byzantine(options)?;
        let m = options.count("m", None, 1, MAX_COUNT)?.map(|m| m as usize);
        Ok(Self { f, m })
    }

    pub fn f(&self) -> usize {
        self.f
    }

    /// The number of updates averaged, when the config fixes it (else `n - f` each round).
    pub fn m(&self) -> Option<usize> {
        self.m
    }
}

impl Bulyan {
    pub fn from_options(options: &mut Options) -> Result<Self, OptionError> {
        Ok(Self {
            f: byzantine(options)?,
        })
    }

    pub fn f(&self) -> usize {
        self.f
    }
}

/// A rule and its settings, as one round applies them.
#[derive(Debug, Clone, Copy)]
enum Rule {
    Median,
    TrimmedMean { beta: f64 },
    Krum { f: usize },
    MultiKrum { f: usize, m: Option<usize> },
    Bulyan { f: usize },
}

impl Rule {
    fn name(self) -> &'static str {
        match self {
            Rule::Median => "median",
            Rule::TrimmedMean { .. } => "trimmed_mean",
            Rule::Krum { .. } => "krum",
            Rule::MultiKrum { .. } => "multi_krum",
            Rule::Bulyan { .. } => "bulyan",
        }
    }
}

macro_rules! robust_strategy {
    ($type:ty, $self:ident => $rule:expr) => {
        impl Strategy for $type {
            fn name(&self) -> &'static str {
                let $self = self;
                $rule.name()
            }

            /// `start.spare` is dropped: the next model is written block by block from the
            /// held updates, not built up in a sum.
            fn begin_round(&self, start: RoundStart) -> Box<dyn RoundAggregation> {
                let $self = self;
                Box::new(RobustRound::new($rule, start.spec, start.prefix))
            }

            fn holds_updates(&self) -> bool {
                true
            }
        }
    };
}

robust_strategy!(Median, _s => Rule::Median);
robust_strategy!(TrimmedMean, s => Rule::TrimmedMean { beta: s.beta });
robust_strategy!(Krum, s => Rule::Krum { f: s.f });
robust_strategy!(MultiKrum, s => Rule::MultiKrum { f: s.f, m: s.m });
robust_strategy!(Bulyan, s => Rule::Bulyan { f: s.f });

/// One round of a robust rule: the updates, held until the round closes.
pub struct RobustRound {
    rule: Rule,
    spec: ModelSpec,
    prefix: usize,
    held: Mutex<Vec<Held>>,
}

/// An accepted update and where each of the model's tensors lies in its bytes (an update may
/// order its tensors differently from the model).
struct Held {
    update: Update,
    offsets: Vec<usize>,
}

impl fmt::Debug for RobustRound {
    // Not derived: that would print every held byte.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RobustRound")
            .field("rule", &self.rule)
            .field("tensors", &self.spec.tensors.len())
            .field("prefix", &self.prefix)
            .field("updates", &self.held.lock().len())
            .finish()
    }
}

impl RobustRound {
    fn new(rule: Rule, spec: ModelSpec, prefix: usize) -> Self {
        Self {
            rule,
            spec,
            prefix,
            held: Mutex::new(Vec::new()),
        }
    }
}

/// The byte offset of each of `spec`'s tensors within `update`'s data, checking that the data
/// is exactly the update's tensors back to back (the aggregator's staging guarantees it; a
/// caller that breaks it gets its update refused, not a panic).
fn offsets(spec: &ModelSpec, update: &Update) -> Result<Vec<usize>, ModelMismatch> {
    let mut own = HashMap::with_capacity(update.spec.tensors.len());
    let mut at = 0usize;
    for tensor in &update.spec.tensors {
        own.entry(tensor.name.as_str()).or_insert(at);
        at = at.saturating_add(tensor.byte_len());
        if at > update.data.len() {
            return Err(ModelMismatch::MissingTensor(tensor.name.clone()));
        }
    }
    if at < update.data.len() {
        return Err(ModelMismatch::UnexpectedTensor(format!(
            "({} bytes after the last tensor)",
            update.data.len() - at
        )));
    }
    spec.tensors
        .iter()
        .map(|t| {
            own.get(t.name.as_str())
                .copied()
                .ok_or_else(|| ModelMismatch::MissingTensor(t.name.clone()))
        })
        .collect()
}

impl RoundAggregation for RobustRound {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn add(&self, update: Update) -> Result<(), ModelMismatch> {
        self.spec.check_update(&update.spec)?;
        let offsets = offsets(&self.spec, &update)?;
        self.held.lock().push(Held { update, offsets });
        Ok(())
    }

    fn updates(&self) -> usize {
        self.held.lock().len()
    }

    fn finalize(self: Box<Self>, _previous: Option<&[u8]>) -> Result<Finalized, String> {
        let RobustRound {
            rule,
            spec,
            prefix,
            held,
        } = *self;
        let mut held = held.into_inner();
        if held.is_empty() {
            return Err(format!(
                "no update was added ({} needs at least one)",
                rule.name()
            ));
        }
        held.sort_by(|a, b| a.update.key.cmp(&b.update.key));
        let result = Rows::new(&spec, &held).and_then(|rows| aggregate(rule, &rows, prefix));
        let bytes = held.iter().map(|h| h.update.data.len()).sum();
        crate::memory::drop_large(held, bytes);
        let (model, finite) = result?;
        if !finite {
            return Err(NOT_FINITE.to_string());
        }
        Ok(Finalized {
            model,
            checked_finite: true,
        })
    }
}

/// The round's updates in key order, tensor by tensor.
struct Rows<'a> {
    spec: &'a ModelSpec,
    /// `bytes[t][i]`: update `i`'s bytes of the model's tensor `t`.
    bytes: Vec<Vec<&'a [u8]>>,
    count: usize,
}

/// A run of coordinates of one tensor.
#[derive(Debug, Clone, Copy)]
struct Block {
    tensor: usize,
    start: usize,
    len: usize,
}

impl<'a> Rows<'a> {
    fn new(spec: &'a ModelSpec, held: &'a [Held]) -> Result<Self, String> {
        let bytes = spec
            .tensors
            .iter()
            .enumerate()
            .map(|(t, tensor)| {
                held.iter()
                    .map(|h| {
                        let start = *h.offsets.get(t)?;
                        h.update.data.get(start..start + tensor.byte_len())
                    })
                    .collect::<Option<Vec<_>>>()
            })
            .collect::<Option<Vec<_>>>()
            .ok_or("an update's bytes do not hold the model's tensors")?;
        Ok(Self {
            spec,
            bytes,
            count: held.len(),
        })
    }

    fn dtype(&self, block: Block) -> DType {
        self.spec.tensors[block.tensor].dtype
    }

    /// Update `row`'s bytes of `block`.
    fn block(&self, block: Block, row: usize) -> &'a [u8] {
        let size = self.dtype(block).size_bytes();
        &self.bytes[block.tensor][row][block.start * size..(block.start + block.len) * size]
    }
}

/// Coordinates per block when `rows` updates are worked on together.
fn block_len(rows: usize) -> usize {
    (WORKING_VALUES / rows.max(1)).clamp(MIN_BLOCK, MAX_BLOCK) / 64 * 64
}

/// Every tensor of `spec` cut into blocks of `len` coordinates (the last of each shorter).
fn blocks(spec: &ModelSpec, len: usize) -> Vec<Block> {
    let mut blocks = Vec::new();
    for (tensor, t) in spec.tensors.iter().enumerate() {
        let count = t.element_count();
        for start in (0..count).step_by(len) {
            blocks.push(Block {
                tensor,
                start,
                len: len.min(count - start),
            });
        }
    }
    blocks
}

fn aggregate(rule: Rule, rows: &Rows<'_>, prefix: usize) -> Result<(ModelBuffer, bool), String> {
    let n = rows.count;
    let all: Vec<usize> = (0..n).collect();
    match rule {
        Rule::Median => Ok(coordinatewise(rows, &all, prefix, Coordinate::Median)),
        Rule::TrimmedMean { beta } => {
            let k = (beta * n as f64).floor() as usize;
            if 2 * k >= n {
                // Only a `beta` that `from_options` refuses gets here.
                return Err(format!(
                    "trimmed_mean with beta = {beta} trims all {n} updates"
                ));
            }
            Ok(coordinatewise(
                rows,
                &all,
                prefix,
                Coordinate::Trimmed { k },
            ))
        }
        Rule::Krum { f } => {
            krum_bound("krum", f, n)?;
            let distances = distances(rows);
            let scores = scores(&distances, n, &all, n - f - 2);
            Ok(copy_row(rows, best(&scores), prefix))
        }
        Rule::MultiKrum { f, m } => {
            krum_bound("multi_krum", f, n)?;
            let m = m.unwrap_or(n - f);
            if m > n - f {
                return Err(format!(
                    "multi_krum averages m = {m} updates, more than n - f = {} (n = {n}, f = {f})",
                    n - f
                ));
            }
            let distances = distances(rows);
            let scores = scores(&distances, n, &all, n - f - 2);
            let mut ranked = all.clone();
            // Stable: equal scores keep key order.
            ranked.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
            let mut chosen = ranked[..m].to_vec();
            chosen.sort_unstable();
            Ok(coordinatewise(rows, &chosen, prefix, Coordinate::Mean))
        }
        Rule::Bulyan { f } => {
            if n < 4 * f + 3 {
                return Err(format!(
                    "bulyan needs at least 4f + 3 = {} updates (f = {f}); the round has {n}",
                    4 * f + 3
                ));
            }
            let theta = n - 2 * f;
            let distances = distances(rows);
            let mut remaining = all;
            let mut selected = Vec::with_capacity(theta);
            for _ in 0..theta {
                let r = remaining.len();
                let neighbours = r.saturating_sub(f + 2).max(1).min(r - 1);
                let scores = scores(&distances, n, &remaining, neighbours);
                selected.push(remaining.remove(best(&scores)));
            }
            selected.sort_unstable();
            let beta = theta - 2 * f;
            Ok(coordinatewise(
                rows,
                &selected,
                prefix,
                Coordinate::ClosestToMedian { beta },
            ))
        }
    }
}

fn krum_bound(name: &str, f: usize, n: usize) -> Result<(), String> {
    if n <= 2 * f + 2 {
        return Err(format!(
            "{name} needs more than 2f + 2 = {} updates (f = {f}); the round has {n}",
            2 * f + 2
        ));
    }
    Ok(())
}

/// Krum's score of each of `set`'s rows within `set`: the sum of its `neighbours` smallest
/// squared distances to the set's other rows.
fn scores(distances: &[f64], n: usize, set: &[usize], neighbours: usize) -> Vec<f64> {
    let mut others = Vec::with_capacity(set.len());
    set.iter()
        .map(|&i| {
            others.clear();
            others.extend(
                set.iter()
                    .filter(|&&j| j != i)
                    .map(|&j| distances[i * n + j]),
            );
            // Sorted, so that the sum is taken in one order whatever the set's order.
            others.sort_unstable_by(f64::total_cmp);
            others.iter().take(neighbours).sum()
        })
        .collect()
}

/// The position of the lowest score; the first (lowest key) among equals.
fn best(scores: &[f64]) -> usize {
    scores
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// The squared Euclidean distance between every two rows over the whole model, `n × n`,
/// row-major, symmetric, zero on the diagonal.
fn distances(rows: &Rows<'_>) -> Vec<f64> {
    let n = rows.count;
    let blocks = blocks(rows.spec, block_len(n));
    let stripes = STRIPES
        .min(blocks.len())
        .min(PARTIALS_BYTES / (n * n * 8).max(1))
        .max(1);
    let partials: Vec<Vec<f64>> = (0..stripes)
        .into_par_iter()
        .map(|stripe| {
            let range = stripe * blocks.len() / stripes..(stripe + 1) * blocks.len() / stripes;
            let mut sums = vec![0f64; n * n];
            let (mut narrow, mut wide) = (Vec::new(), Vec::new());
            for &block in &blocks[range] {
                if rows.dtype(block) == DType::F64 {
                    pair_block::<f64>(rows, block, &mut wide, &mut sums);
                } else {
                    pair_block::<f32>(rows, block, &mut narrow, &mut sums);
                }
            }
            sums
        })
        .collect();
    let mut total = vec![0f64; n * n];
    for partial in &partials {
        for (t, p) in total.iter_mut().zip(partial) {
            *t += p;
        }
    }
    for i in 0..n {
        for j in i + 1..n {
            total[j * n + i] = total[i * n + j];
        }
    }
    total
}

/// Adds every pair's squared distance over `block` into the upper triangle of `sums`.
fn pair_block<T: Value>(rows: &Rows<'_>, block: Block, scratch: &mut Vec<T>, sums: &mut [f64]) {
    let n = rows.count;
    let dtype = rows.dtype(block);
    let direct: Option<Vec<&[T]>> = (0..n)
        .map(|i| T::view(dtype, rows.block(block, i)))
        .collect();
    let views = match direct {
        Some(views) => views,
        None => {
            decode_rows(rows, block, &(0..n).collect::<Vec<_>>(), scratch);
            scratch.chunks_exact(block.len.max(1)).collect()
        }
    };
    for i in 0..n {
        for j in i + 1..n {
            sums[i * n + j] += squared_distance(views[i], views[j]);
        }
    }
}

/// `Σ (a[k] - b[k])²` in `f64`, in independent lanes so that it vectorizes.
#[inline]
fn squared_distance<T: Value>(a: &[T], b: &[T]) -> f64 {
    const LANES: usize = 8;
    let (a, b) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f64 = a
        .remainder()
        .iter()
        .zip(b.remainder())
        .map(|(x, y)| {
            let d = x.wide() - y.wide();
            d * d
        })
        .sum();
    let mut lanes = [0f64; LANES];
    for (x, y) in a.zip(b) {
        for ((lane, x), y) in lanes.iter_mut().zip(x).zip(y) {
            let d = x.wide() - y.wide();
            *lane += d * d;
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// Decodes `pick`'s rows of `block` into `scratch`, one after another (`pick.len() × len`).
fn decode_rows<T: Value>(rows: &Rows<'_>, block: Block, pick: &[usize], scratch: &mut Vec<T>) {
    let dtype = rows.dtype(block);
    scratch.clear();
    scratch.resize(pick.len() * block.len, T::default());
    if block.len == 0 {
        return;
    }
    for (out, &row) in scratch.chunks_exact_mut(block.len).zip(pick) {
        T::decode(dtype, rows.block(block, row), out);
    }
}

/// What a coordinate-wise pass makes of each coordinate's values across the rows it reads.
#[derive(Debug, Clone, Copy)]
enum Coordinate {
    Median,
    /// Drop the `k` lowest and `k` highest, average the rest.
    Trimmed {
        k: usize,
    },
    Mean,
    /// Average the `beta` values closest to the median.
    ClosestToMedian {
        beta: usize,
    },
}

/// The model whose every coordinate is `op` of `pick`'s rows' values there, and whether it is
/// finite.
fn coordinatewise(
    rows: &Rows<'_>,
    pick: &[usize],
    prefix: usize,
    op: Coordinate,
) -> (ModelBuffer, bool) {
    let spec = rows.spec;
    let len = block_len(pick.len());
    let network = match op {
        Coordinate::Mean => None,
        _ if pick.len() <= NETWORK_MAX => Some(sorting_network(pick.len())),
        _ => None,
    };
    let mut model = ModelBuffer::new(prefix, spec.byte_len());
    // One entry per block, a few dozen bytes against a block's kilobytes of output: a flat
    // list lets rayon split the work evenly however the model's tensors are sized (nested
    // parallel iterators over each tensor's blocks instead held more scratch at once).
    let mut tasks = Vec::new();
    let mut rest = model.data_mut();
    for (tensor, t) in spec.tensors.iter().enumerate() {
        let (here, after) = std::mem::take(&mut rest).split_at_mut(t.byte_len());
        rest = after;
        let size = t.dtype.size_bytes();
        for (index, out) in here.chunks_mut(len * size).enumerate() {
            let block = Block {
                tensor,
                start: index * len,
                len: out.len() / size,
            };
            tasks.push((block, out));
        }
    }
    let finite = tasks
        .into_par_iter()
        .map_init(Scratch::default, |scratch, (block, out)| {
            let dtype = rows.dtype(block);
            let Scratch { narrow, wide, work } = scratch;
            work.reset(block.len);
            let network = network.as_deref();
            if dtype == DType::F64 {
                reduce_block(rows, block, pick, op, network, wide, work);
            } else {
                reduce_block(rows, block, pick, op, network, narrow, work);
            }
            write_values(dtype, &work.out, out);
            kernels::all_finite(dtype, out)
        })
        .reduce(|| true, |a, b| a && b);
    (model, finite)
}

/// Up to this many rows, coordinate-wise rules sort each block's columns with a sorting network
/// applied to whole rows (compare-exchanges of two rows, which vectorize across coordinates);
/// beyond it, the network's `O(n log² n)` passes cost more than selecting in each column.
const NETWORK_MAX: usize = 64;

/// Coordinates a network is applied to at a time: `n` rows of them stay in L1.
const NETWORK_LANES: usize = 256;

/// A worker's reusable buffers.
#[derive(Default)]
struct Scratch {
    narrow: Buffers<f32>,
    wide: Buffers<f64>,
    work: Work,
}

#[derive(Default)]
struct Buffers<T> {
    rows: Vec<T>,
    column: Vec<T>,
}

/// Per-coordinate results of a block, and Bulyan's intermediate ones.
#[derive(Default)]
struct Work {
    out: Vec<f64>,
    median: Vec<f64>,
    start: Vec<f64>,
}

impl Work {
    fn reset(&mut self, len: usize) {
        for v in [&mut self.out, &mut self.median, &mut self.start] {
            v.clear();
            v.resize(len, 0.0);
        }
    }
}

fn reduce_block<T: Value>(
    rows: &Rows<'_>,
    block: Block,
    pick: &[usize],
    op: Coordinate,
    network: Option<&[(usize, usize)]>,
    buffers: &mut Buffers<T>,
    work: &mut Work,
) {
    let len = block.len;
    if len == 0 || pick.is_empty() {
        return;
    }
    decode_rows(rows, block, pick, &mut buffers.rows);
    let data = &mut buffers.rows;
    match (op, network) {
        (Coordinate::Mean, _) => add_rows(data, len, 0..pick.len(), &mut work.out),
        (_, Some(network)) => {
            sort_columns(data, len, network);
            from_sorted_rows(op, data, len, work);
        }
        (_, None) => {
            let column = &mut buffers.column;
            column.clear();
            column.resize(pick.len(), T::default());
            for (c, o) in work.out.iter_mut().enumerate() {
                for (slot, row) in column.iter_mut().zip(data.chunks_exact(len)) {
                    *slot = row[c];
                }
                *o = match op {
                    Coordinate::Median => median(column),
                    Coordinate::Trimmed { k } => trimmed_mean(column, k),
                    Coordinate::ClosestToMedian { beta } => closest_to_median(column, beta),
                    Coordinate::Mean => trimmed_mean(column, 0),
                };
            }
        }
    }
}

/// Adds rows `range` of `data` into `out` and divides by their count: row by row, so that the
/// additions vectorize.
fn add_rows<T: Value>(data: &[T], len: usize, range: std::ops::Range<usize>, out: &mut [f64]) {
    let count = range.len() as f64;
    for row in data.chunks_exact(len).skip(range.start).take(range.len()) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += v.wide();
        }
    }
    for o in out.iter_mut() {
        *o /= count;
    }
}

/// Batcher's odd-even merge sort for `n` values, as compare-exchanges `(low, high)` applied in
/// order. Built for the next power of two with comparators touching a position `≥ n` left out:
/// that is exact, since padding of `+∞` would never move.
fn sorting_network(n: usize) -> Vec<(usize, usize)> {
    let size = n.next_power_of_two();
    let mut pairs = Vec::new();
    let mut p = 1;
    while p < size {
        let mut k = p;
        while k >= 1 {
            let mut j = k % p;
            while j + k < size {
                for i in 0..k.min(size - j - k) {
                    let (low, high) = (i + j, i + j + k);
                    if low / (2 * p) == high / (2 * p) && high < n {
                        pairs.push((low, high));
                    }
                }
                j += 2 * k;
            }
            k /= 2;
        }
        p *= 2;
    }
    pairs
}

/// Sorts every column of `data` (rows of `len`) ascending, `NETWORK_LANES` columns at a time.
fn sort_columns<T: Value>(data: &mut [T], len: usize, network: &[(usize, usize)]) {
    for lane in (0..len).step_by(NETWORK_LANES) {
        let lanes = lane..len.min(lane + NETWORK_LANES);
        for &(low, high) in network {
            let (below, above) = data.split_at_mut(high * len);
            let x = &mut below[low * len..][lanes.clone()];
            let y = &mut above[lanes.clone()];
            for (x, y) in x.iter_mut().zip(y.iter_mut()) {
                // Selects rather than branches: this is what vectorizes.
                let (a, b) = (*x, *y);
                let swap = b < a;
                *x = if swap { b } else { a };
                *y = if swap { a } else { b };
            }
        }
    }
}

/// A coordinate-wise rule's results from rows whose columns are sorted.
fn from_sorted_rows<T: Value>(op: Coordinate, data: &[T], len: usize, work: &mut Work) {
    let n = data.len() / len;
    let row = |i: usize| &data[i * len..(i + 1) * len];
    let median_into = |out: &mut [f64]| {
        if n % 2 == 1 {
            for (o, v) in out.iter_mut().zip(row(n / 2)) {
                *o = v.wide();
            }
        } else {
            for ((o, a), b) in out.iter_mut().zip(row(n / 2 - 1)).zip(row(n / 2)) {
                *o = 0.5 * a.wide() + 0.5 * b.wide();
            }
        }
    };
    match op {
        Coordinate::Median => median_into(&mut work.out),
        Coordinate::Trimmed { k } => add_rows(data, len, k..n - k, &mut work.out),
        Coordinate::Mean => add_rows(data, len, 0..n, &mut work.out),
        Coordinate::ClosestToMedian { beta } => {
            let beta = beta.min(n);
            let Work { out, median, start } = work;
            median_into(median);
            // The beta closest values are a window of the sorted ones; sliding it up from the
            // bottom by one is right while the value it would take is strictly closer than
            // the one it would drop, and once wrong it stays so: the window starts at the count.
            for s in 0..n - beta {
                for ((st, m), (low, high)) in start
                    .iter_mut()
                    .zip(median.iter())
                    .zip(row(s).iter().zip(row(s + beta)))
                {
                    let closer = (high.wide() - m).abs() < (low.wide() - m).abs();
                    *st += if closer { 1.0 } else { 0.0 };
                }
            }
            for i in 0..n {
                let at = i as f64;
                for ((o, st), v) in out.iter_mut().zip(start.iter()).zip(row(i)) {
                    let inside = at >= *st && at < *st + beta as f64;
                    *o += if inside { v.wide() } else { 0.0 };
                }
            }
            for o in out.iter_mut() {
                *o /= beta as f64;
            }
        }
    }
}

/// The median of `values` (reordered); for an even count, the mean of the two middle values.
fn median<T: Value>(values: &mut [T]) -> f64 {
    let (count, mid) = (values.len(), values.len() / 2);
    let (lower, upper, _) = values.select_nth_unstable_by(mid, T::order);
    let upper = upper.wide();
    if count % 2 == 1 {
        return upper;
    }
    // Halves first: the sum of two large `f64`s could overflow.
    lower
        .iter()
        .copied()
        .max_by(T::order)
        .map_or(upper, |lower| 0.5 * lower.wide() + 0.5 * upper)
}

/// The mean of `values` without its `k` lowest and `k` highest (`values.len() > 2k`).
fn trimmed_mean<T: Value>(values: &mut [T], k: usize) -> f64 {
    let n = values.len();
    let kept = if k == 0 {
        &values[..]
    } else {
        // The k lowest go before position k; then, among the rest, the n - 2k lowest are kept.
        values.select_nth_unstable_by(k, T::order);
        let rest = &mut values[k..];
        rest.select_nth_unstable_by(n - 2 * k - 1, T::order);
        &rest[..n - 2 * k]
    };
    kept.iter().map(|v| v.wide()).sum::<f64>() / kept.len() as f64
}

/// The mean of the `beta` values closest to the median of `values` (reordered), the lower of
/// two equally close ones first.
fn closest_to_median<T: Value>(values: &mut [T], beta: usize) -> f64 {
    values.sort_unstable_by(T::order);
    let n = values.len();
    let x = |i: usize| values[i].wide();
    let median = if n % 2 == 1 {
        x(n / 2)
    } else {
        0.5 * x(n / 2 - 1) + 0.5 * x(n / 2)
    };
    // The closest values are a run of the sorted ones around the median: grow it one value at
    // a time toward the nearer neighbour.
    let mut low = values.partition_point(|v| v.wide() < median);
    let mut high = low;
    let mut sum = 0.0;
    let take = beta.min(n);
    for _ in 0..take {
        if low > 0 && (high == n || median - x(low - 1) <= x(high) - median) {
            low -= 1;
            sum += x(low);
        } else {
            sum += x(high);
            high += 1;
        }
    }
    sum / take as f64
}

/// The model that is row `row`, byte for byte, and whether it is finite.
fn copy_row(rows: &Rows<'_>, row: usize, prefix: usize) -> (ModelBuffer, bool) {
    const CHUNK: usize = 1 << 20;
    let spec = rows.spec;
    let mut model = ModelBuffer::new(prefix, spec.byte_len());
    let mut rest = model.data_mut();
    for (tensor, t) in spec.tensors.iter().enumerate() {
        let (here, after) = std::mem::take(&mut rest).split_at_mut(t.byte_len());
        rest = after;
        here.par_chunks_mut(CHUNK)
            .zip(rows.bytes[tensor][row].par_chunks(CHUNK))
            .for_each(|(out, bytes)| out.copy_from_slice(bytes));
    }
    let finite = super::model_is_finite(spec, model.data());
    (model, finite)
}

/// Writes `values` into `out` as little-endian `dtype`, each rounded once.
fn write_values(dtype: DType, values: &[f64], out: &mut [u8]) {
    match dtype {
        DType::F32 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&(*v as f32).to_le_bytes());
            }
        }
        _ => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(dtype.size_bytes())) {
                kernels::write(dtype, *v, o);
            }
        }
    }
}

/// A decoded value: `f32` for `F32`, `F16` and `BF16` tensors (exact for all three), `f64` for
/// `F64` ones.
trait Value: bytemuck::Pod + Default + PartialOrd + Send + Sync {
    /// Decodes little-endian `dtype` bytes into `out`.
    fn decode(dtype: DType, bytes: &[u8], out: &mut [Self]);
    /// The bytes as values where they lie, when they are this type, little-endian and aligned.
    fn view(dtype: DType, bytes: &[u8]) -> Option<&[Self]>;
    fn wide(self) -> f64;
    fn order(a: &Self, b: &Self) -> Ordering;
}

impl Value for f32 {
    fn decode(dtype: DType, bytes: &[u8], out: &mut [f32]) {
        match dtype {
            DType::F32 => match Self::view(dtype, bytes) {
                Some(values) if values.len() == out.len() => out.copy_from_slice(values),
                _ => {
                    for (o, x) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                        *o = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
                    }
                }
            },
            DType::BF16 => {
                // The top half of an f32: a shift, which vectorizes.
                for (o, x) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_le_bytes([x[0], x[1]])) << 16);
                }
            }
            DType::F16 => match bytemuck::try_cast_slice::<u8, f16>(bytes) {
                // half converts whole slices with F16C where the CPU has it.
                Ok(halves) if cfg!(target_endian = "little") && halves.len() == out.len() => {
                    halves.convert_to_f32_slice(out)
                }
                _ => {
                    for (o, x) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                        *o = kernels::read(DType::F16, x) as f32;
                    }
                }
            },
            // Not taken: F64 tensors are decoded to f64.
            DType::F64 => {
                for (o, x) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                    *o = kernels::read(DType::F64, x) as f32;
                }
            }
        }
    }

    fn view(dtype: DType, bytes: &[u8]) -> Option<&[f32]> {
        if dtype != DType::F32 || cfg!(target_endian = "big") {
            return None;
        }
        bytemuck::try_cast_slice(bytes).ok()
    }

    #[inline(always)]
    fn wide(self) -> f64 {
        f64::from(self)
    }

    fn order(a: &f32, b: &f32) -> Ordering {
        a.total_cmp(b)
    }
}

impl Value for f64 {
    fn decode(dtype: DType, bytes: &[u8], out: &mut [f64]) {
        match Self::view(dtype, bytes) {
            Some(values) if values.len() == out.len() => out.copy_from_slice(values),
            _ => {
                let size = dtype.size_bytes();
                for (o, x) in out.iter_mut().zip(bytes.chunks_exact(size)) {
                    *o = kernels::read(dtype, x);
                }
            }
        }
    }

    fn view(dtype: DType, bytes: &[u8]) -> Option<&[f64]> {
        if dtype != DType::F64 || cfg!(target_endian = "big") {
            return None;
        }
        bytemuck::try_cast_slice(bytes).ok()
    }

    #[inline(always)]
    fn wide(self) -> f64 {
        self
    }

    fn order(a: &f64, b: &f64) -> Ordering {
        a.total_cmp(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::AccumulatorOptions;
    use crate::kernels::{decode_values, encode_values};
    use crate::model::TensorSpec;
    use crate::strategy::{FedAvg, build};
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    fn spec(tensors: &[(&str, DType, &[usize])]) -> ModelSpec {
        crate::model::spec_of(tensors)
    }

    /// One model per dtype, a mixed one and a single value. Blocks are 4096 coordinates for
    /// up to 16 updates: "e" (4097) is one and a bit, the others part of one.
    fn models() -> Vec<ModelSpec> {
        vec![
            spec(&[("w", DType::F32, &[517])]),
            spec(&[("w", DType::F64, &[517])]),
            spec(&[("w", DType::F16, &[517])]),
            spec(&[("w", DType::BF16, &[517])]),
            // "b" starts at byte 42: an F32 tensor that cannot be read in place.
            spec(&[
                ("a", DType::F16, &[3, 7]),
                ("b", DType::F32, &[1]),
                ("c", DType::BF16, &[100]),
                ("d", DType::F64, &[123]),
                ("e", DType::F32, &[4097]),
            ]),
            spec(&[("w", DType::F32, &[1])]),
        ]
    }

    /// A rule's options, as name and value.
    type Pairs = &'static [(&'static str, f64)];

    /// A rule, its options, and the model it must make (`None`: the round must fail).
    type Case = (&'static str, Pairs, Option<Vec<f64>>);

    fn options(pairs: &[(&str, f64)]) -> Options {
        Options::new(pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    fn strategy(name: &str, pairs: &[(&str, f64)]) -> Arc<dyn Strategy> {
        build(name, options(pairs), AccumulatorOptions::default()).expect("valid options")
    }

    use std::sync::Arc;

    /// Random values for `spec` (in its order), each exactly representable in its dtype.
    fn random_values(spec: &ModelSpec, rng: &mut StdRng) -> Vec<f64> {
        spec.tensors
            .iter()
            .flat_map(|t| {
                let raw: Vec<f64> = (0..t.element_count())
                    .map(|_| rng.random_range(-2.0..2.0))
                    .collect();
                decode_values(t.dtype, &encode_values(t.dtype, &raw))
            })
            .collect()
    }

    /// An update of `values` (in the model's order), its tensors laid out in reverse order when
    /// `reversed`, as an upload may; its sample count is arbitrary, since the rules ignore it.
    fn update(spec: &ModelSpec, key: &str, values: &[f64], reversed: bool, weight: f64) -> Update {
        let mut parts = Vec::new();
        let mut start = 0;
        for t in &spec.tensors {
            let end = start + t.element_count();
            parts.push((t.clone(), encode_values(t.dtype, &values[start..end])));
            start = end;
        }
        if reversed {
            parts.reverse();
        }
        Update {
            key: key.into(),
            spec: ModelSpec {
                tensors: parts.iter().map(|(t, _)| t.clone()).collect(),
            },
            data: parts.concat_bytes().into(),
            weight,
            metrics: Default::default(),
        }
    }

    trait ConcatBytes {
        fn concat_bytes(&self) -> Vec<u8>;
    }

    impl ConcatBytes for Vec<(TensorSpec, Vec<u8>)> {
        fn concat_bytes(&self) -> Vec<u8> {
            self.iter().flat_map(|(_, b)| b.iter().copied()).collect()
        }
    }

    fn decode_model(spec: &ModelSpec, data: &[u8]) -> Vec<f64> {
        let mut offset = 0;
        spec.tensors
            .iter()
            .flat_map(|t| {
                let bytes = &data[offset..offset + t.byte_len()];
                offset += t.byte_len();
                decode_values(t.dtype, bytes)
            })
            .collect()
    }

    /// Finalizes a round of `strategy` over `updates`, added in the order given.
    fn run(
        strategy: &dyn Strategy,
        spec: &ModelSpec,
        updates: Vec<Update>,
    ) -> Result<Vec<f64>, String> {
        let round = strategy.begin_round(RoundStart {
            prefix: 16,
            ..RoundStart::bare(1, spec.clone())
        });
        for u in updates {
            round.add(u).map_err(|e| e.to_string())?;
        }
        let finalized = round.finalize(None)?;
        assert!(finalized.checked_finite);
        assert_eq!(finalized.model.as_ref().len(), 16 + spec.byte_len());
        Ok(decode_model(spec, finalized.model.data()))
    }

    /// `rows[i]` as the update of key `p{i:02}`, added in a shuffled order, every other one
    /// with its tensors reversed, each with a different sample count.
    fn shuffled_updates(spec: &ModelSpec, rows: &[Vec<f64>], rng: &mut StdRng) -> Vec<Update> {
        let mut updates: Vec<Update> = rows
            .iter()
            .enumerate()
            .map(|(i, values)| {
                update(
                    spec,
                    &format!("p{i:02}"),
                    values,
                    i % 2 == 1,
                    1.0 + 37.0 * i as f64,
                )
            })
            .collect();
        updates.shuffle(rng);
        updates
    }

    /// Within 1e-6 relative, or within the dtype's own rounding of the exact result.
    fn assert_close(spec: &ModelSpec, got: &[f64], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        let mut at = 0;
        for t in &spec.tensors {
            let (relative, absolute) = match t.dtype {
                DType::F32 | DType::F64 => (1e-6, 1e-15),
                DType::F16 => (2f64.powi(-10), 2f64.powi(-24)),
                DType::BF16 => (2f64.powi(-7), 1e-38),
            };
            for k in at..at + t.element_count() {
                assert!(
                    (got[k] - want[k]).abs() <= relative * want[k].abs() + absolute,
                    "{what}: tensor {} ({}) element {}: got {}, want {}",
                    t.name,
                    t.dtype,
                    k - at,
                    got[k],
                    want[k]
                );
            }
            at += t.element_count();
        }
    }

    fn column(rows: &[Vec<f64>], c: usize) -> Vec<f64> {
        rows.iter().map(|r| r[c]).collect()
    }

    fn sorted(mut v: Vec<f64>) -> Vec<f64> {
        v.sort_by(f64::total_cmp);
        v
    }

    fn reference_median(rows: &[Vec<f64>]) -> Vec<f64> {
        (0..rows[0].len())
            .map(|c| {
                let v = sorted(column(rows, c));
                let n = v.len();
                if n % 2 == 1 {
                    v[n / 2]
                } else {
                    (v[n / 2 - 1] + v[n / 2]) / 2.0
                }
            })
            .collect()
    }

    fn reference_trimmed_mean(rows: &[Vec<f64>], beta: f64) -> Vec<f64> {
        let n = rows.len();
        let k = (beta * n as f64).floor() as usize;
        (0..rows[0].len())
            .map(|c| {
                let v = sorted(column(rows, c));
                let kept = &v[k..n - k];
                kept.iter().sum::<f64>() / kept.len() as f64
            })
            .collect()
    }

    fn reference_mean(rows: &[&Vec<f64>]) -> Vec<f64> {
        (0..rows[0].len())
            .map(|c| rows.iter().map(|r| r[c]).sum::<f64>() / rows.len() as f64)
            .collect()
    }

    fn reference_distances(rows: &[Vec<f64>]) -> Vec<Vec<f64>> {
        rows.iter()
            .map(|a| {
                rows.iter()
                    .map(|b| a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum())
                    .collect()
            })
            .collect()
    }

    /// Krum's score of each of `set`: the sum of its `neighbours` nearest squared distances.
    fn reference_scores(d: &[Vec<f64>], set: &[usize], neighbours: usize) -> Vec<f64> {
        set.iter()
            .map(|&i| {
                let others = sorted(set.iter().filter(|&&j| j != i).map(|&j| d[i][j]).collect());
                others[..neighbours].iter().sum()
            })
            .collect()
    }

    /// `set`'s positions from the lowest score up, ties in key (position) order.
    fn ranked(scores: &[f64]) -> Vec<usize> {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        order
    }

    fn reference_krum(rows: &[Vec<f64>], f: usize) -> Option<Vec<f64>> {
        let n = rows.len();
        if n <= 2 * f + 2 {
            return None;
        }
        let all: Vec<usize> = (0..n).collect();
        let scores = reference_scores(&reference_distances(rows), &all, n - f - 2);
        Some(rows[ranked(&scores)[0]].clone())
    }

    fn reference_multi_krum(rows: &[Vec<f64>], f: usize, m: Option<usize>) -> Option<Vec<f64>> {
        let n = rows.len();
        let m = m.unwrap_or(n.saturating_sub(f));
        if n <= 2 * f + 2 || m > n - f {
            return None;
        }
        let all: Vec<usize> = (0..n).collect();
        let scores = reference_scores(&reference_distances(rows), &all, n - f - 2);
        let chosen: Vec<&Vec<f64>> = ranked(&scores)[..m].iter().map(|&i| &rows[i]).collect();
        Some(reference_mean(&chosen))
    }

    fn reference_bulyan(rows: &[Vec<f64>], f: usize) -> Option<Vec<f64>> {
        let n = rows.len();
        if n < 4 * f + 3 {
            return None;
        }
        let d = reference_distances(rows);
        let theta = n - 2 * f;
        let beta = theta - 2 * f;
        let mut remaining: Vec<usize> = (0..n).collect();
        let mut selected = Vec::new();
        while selected.len() < theta {
            let r = remaining.len();
            let neighbours = (r as i64 - f as i64 - 2).max(1).min(r as i64 - 1) as usize;
            let best = ranked(&reference_scores(&d, &remaining, neighbours))[0];
            selected.push(remaining.remove(best));
        }
        let chosen: Vec<Vec<f64>> = selected.iter().map(|&i| rows[i].clone()).collect();
        let median = reference_median(&chosen);
        Some(
            (0..rows[0].len())
                .map(|c| {
                    let mut v = column(&chosen, c);
                    // By distance to the median, the lower value first on a tie.
                    v.sort_by(|a, b| {
                        (a - median[c])
                            .abs()
                            .total_cmp(&(b - median[c]).abs())
                            .then(a.total_cmp(b))
                    });
                    v[..beta].iter().sum::<f64>() / beta as f64
                })
                .collect(),
        )
    }

    /// Runs rule `name` with `pairs` on every model for n = 1..=12 against `reference`, which
    /// says `None` where the round must fail.
    fn check_against(
        name: &str,
        pairs: &[(&str, f64)],
        reference: impl Fn(&[Vec<f64>]) -> Option<Vec<f64>>,
    ) {
        let strategy = strategy(name, pairs);
        for (index, spec) in models().iter().enumerate() {
            for n in 1..=12 {
                let mut rng = StdRng::seed_from_u64((index * 100 + n) as u64);
                let rows: Vec<Vec<f64>> = (0..n).map(|_| random_values(spec, &mut rng)).collect();
                let updates = shuffled_updates(spec, &rows, &mut rng);
                let what = format!("{name} {pairs:?} on model {index} with n = {n}");
                match (reference(&rows), run(strategy.as_ref(), spec, updates)) {
                    (Some(want), Ok(got)) => assert_close(spec, &got, &want, &what),
                    (None, Err(_)) => {}
                    (want, got) => panic!(
                        "{what}: the reference {} but the rule gave {got:?}",
                        if want.is_some() {
                            "has a model"
                        } else {
                            "fails"
                        },
                    ),
                }
            }
        }
    }

    #[test]
    fn median_matches_the_reference() {
        check_against("median", &[], |rows| Some(reference_median(rows)));
    }

    #[test]
    fn trimmed_mean_matches_the_reference() {
        for beta in [0.0, 0.25, 0.45] {
            check_against("trimmed_mean", &[("beta", beta)], |rows| {
                Some(reference_trimmed_mean(rows, beta))
            });
        }
        // The default trims 10% from each end.
        check_against("trimmed_mean", &[], |rows| {
            Some(reference_trimmed_mean(rows, 0.1))
        });
    }

    #[test]
    fn krum_matches_the_reference() {
        for f in [0, 2] {
            check_against("krum", &[("f", f as f64)], |rows| reference_krum(rows, f));
        }
        check_against("krum", &[], |rows| reference_krum(rows, 1));
    }

    #[test]
    fn multi_krum_matches_the_reference() {
        for f in [0, 2] {
            check_against("multi_krum", &[("f", f as f64)], |rows| {
                reference_multi_krum(rows, f, None)
            });
        }
        for m in [1, 3, 7] {
            check_against("multi_krum", &[("m", m as f64)], |rows| {
                reference_multi_krum(rows, 1, Some(m))
            });
        }
    }

    #[test]
    fn bulyan_matches_the_reference() {
        for f in [0, 2] {
            check_against("bulyan", &[("f", f as f64)], |rows| {
                reference_bulyan(rows, f)
            });
        }
        check_against("bulyan", &[], |rows| reference_bulyan(rows, 1));
    }

    #[test]
    fn models_of_many_blocks_and_stripes_match_the_reference() {
        // 71 blocks of f32 (more than the 64 stripes, so stripes differ in length) and an f64
        // tensor after them.
        let spec = spec(&[
            ("w", DType::F32, &[70 * 4096 + 5]),
            ("v", DType::F64, &[999]),
        ]);
        let mut rng = StdRng::seed_from_u64(7);
        let rows: Vec<Vec<f64>> = (0..5).map(|_| random_values(&spec, &mut rng)).collect();
        let cases: Vec<Case> = vec![
            ("median", &[], Some(reference_median(&rows))),
            ("krum", &[("f", 0.0)], reference_krum(&rows, 0)),
            (
                "multi_krum",
                &[("f", 1.0)],
                reference_multi_krum(&rows, 1, None),
            ),
            ("bulyan", &[("f", 0.0)], reference_bulyan(&rows, 0)),
        ];
        for (name, pairs, want) in cases {
            let updates = shuffled_updates(&spec, &rows, &mut rng);
            let got = run(strategy(name, pairs).as_ref(), &spec, updates).unwrap();
            assert_close(&spec, &got, &want.unwrap(), name);
        }
    }

    #[test]
    fn the_distance_matrix_matches_the_reference_over_every_dtype_and_block() {
        // Many blocks and stripes of f32, then tensors of every other dtype, one unaligned.
        let spec = spec(&[
            ("w", DType::F32, &[70 * 4096 + 5]),
            ("h", DType::F16, &[33]),
            ("u", DType::F32, &[77]),
            ("b", DType::BF16, &[4100]),
            ("d", DType::F64, &[999]),
        ]);
        let mut rng = StdRng::seed_from_u64(3);
        let rows: Vec<Vec<f64>> = (0..6).map(|_| random_values(&spec, &mut rng)).collect();
        let round = RobustRound::new(Rule::Median, spec.clone(), 0);
        for update in shuffled_updates(&spec, &rows, &mut rng) {
            round.add(update).unwrap();
        }
        let mut held = round.held.into_inner();
        held.sort_by(|a, b| a.update.key.cmp(&b.update.key));
        let got = distances(&Rows::new(&spec, &held).unwrap());
        let want = reference_distances(&rows);
        for i in 0..6 {
            for j in 0..6 {
                let (g, w) = (got[i * 6 + j], want[i][j]);
                assert!((g - w).abs() <= 1e-12 * w, "d({i}, {j}) = {g}, want {w}");
            }
        }
    }

    /// Bulyan's last step on one coordinate, both ways: per column, and on sorted rows.
    fn closest_both_ways(values: &[f64], beta: usize) -> f64 {
        let column = closest_to_median(&mut values.to_vec(), beta);
        let mut rows = values.to_vec();
        sort_columns(&mut rows, 1, &sorting_network(values.len()));
        let mut work = Work::default();
        work.reset(1);
        from_sorted_rows(Coordinate::ClosestToMedian { beta }, &rows, 1, &mut work);
        assert_eq!(work.out[0], column, "{values:?} {beta}");
        column
    }

    #[test]
    fn bulyan_takes_the_lower_of_two_values_equally_close_to_the_median() {
        // Median 4; after it, 2 and 6 are equally close.
        let values = [8.0, 0.0, 6.0, 2.0, 4.0];
        assert_eq!(closest_both_ways(&values, 1), 4.0);
        assert_eq!(closest_both_ways(&values, 2), 3.0);
        assert_eq!(closest_both_ways(&values, 3), 4.0);
        assert_eq!(closest_both_ways(&values, 4), 3.0);
        assert_eq!(closest_both_ways(&values, 5), 4.0);
        // Even count: the median is 3.5, between the two middle values.
        let even = [1.0, 7.0, 3.0, 4.0, 0.0, 6.0];
        assert_eq!(closest_both_ways(&even, 2), 3.5);
        assert_eq!(closest_both_ways(&even, 3), 8.0 / 3.0);
        assert_eq!(closest_both_ways(&even, 6), 21.0 / 6.0);
    }

    #[test]
    fn the_sorting_network_sorts_every_count_up_to_its_limit() {
        let mut rng = StdRng::seed_from_u64(5);
        for n in 1..=NETWORK_MAX {
            let network = sorting_network(n);
            assert!(network.iter().all(|&(a, b)| a < b && b < n), "n = {n}");
            // Every 0-1 input while they are few (by the 0-1 principle, a proof), random
            // ones with repeats beyond; one column each, more columns than a lane group.
            let inputs: Vec<Vec<f32>> = if n <= 12 {
                (0..1u32 << n)
                    .map(|bits| (0..n).map(|i| (bits >> i & 1) as f32).collect())
                    .collect()
            } else {
                (0..300)
                    .map(|_| (0..n).map(|_| rng.random_range(-5..5) as f32).collect())
                    .collect()
            };
            let len = inputs.len();
            let mut data = vec![0f32; n * len];
            for (c, input) in inputs.iter().enumerate() {
                for (i, v) in input.iter().enumerate() {
                    data[i * len + c] = *v;
                }
            }
            sort_columns(&mut data, len, &network);
            for (c, input) in inputs.iter().enumerate() {
                let got: Vec<f32> = (0..n).map(|i| data[i * len + c]).collect();
                let mut want = input.clone();
                want.sort_by(f32::total_cmp);
                assert_eq!(got, want, "n = {n}");
            }
        }
    }

    #[test]
    fn rounds_beyond_the_network_select_per_coordinate_and_match_the_reference() {
        let spec = spec(&[("w", DType::F32, &[37]), ("h", DType::F16, &[5])]);
        for n in [NETWORK_MAX, NETWORK_MAX + 1, 70] {
            let mut rng = StdRng::seed_from_u64(n as u64);
            let rows: Vec<Vec<f64>> = (0..n).map(|_| random_values(&spec, &mut rng)).collect();
            let cases: Vec<Case> = vec![
                ("median", &[], Some(reference_median(&rows))),
                (
                    "trimmed_mean",
                    &[("beta", 0.2)],
                    Some(reference_trimmed_mean(&rows, 0.2)),
                ),
                ("bulyan", &[("f", 5.0)], reference_bulyan(&rows, 5)),
                (
                    "multi_krum",
                    &[("f", 3.0)],
                    reference_multi_krum(&rows, 3, None),
                ),
            ];
            for (name, pairs, want) in cases {
                let updates = shuffled_updates(&spec, &rows, &mut rng);
                let got = run(strategy(name, pairs).as_ref(), &spec, updates).unwrap();
                assert_close(&spec, &got, &want.unwrap(), &format!("{name} n = {n}"));
            }
        }
    }

    #[test]
    fn krum_ties_go_to_the_lowest_key_whatever_the_arrival_order() {
        // Every update is at distance 1 from its nearest other: all three scores are 1.
        let spec = spec(&[("w", DType::F32, &[1])]);
        let updates = [("b", 0.0), ("c", 1.0), ("a", 2.0)];
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]] {
            for (name, pairs) in [
                ("krum", &[("f", 0.0)][..]),
                ("multi_krum", &[("f", 0.0), ("m", 1.0)]),
            ] {
                let round: Vec<Update> = order
                    .iter()
                    .map(|&i| update(&spec, updates[i].0, &[updates[i].1], false, 1.0))
                    .collect();
                let got = run(strategy(name, pairs).as_ref(), &spec, round).unwrap();
                assert_eq!(got, vec![2.0], "{name} with arrival order {order:?}");
            }
        }
    }

    fn round_of(spec: &ModelSpec, n: usize) -> Vec<Update> {
        let mut rng = StdRng::seed_from_u64(n as u64);
        (0..n)
            .map(|i| {
                update(
                    spec,
                    &format!("p{i:02}"),
                    &random_values(spec, &mut rng),
                    false,
                    1.0,
                )
            })
            .collect()
    }

    #[test]
    fn too_few_updates_fail_the_round_and_the_reason_names_the_numbers() {
        let spec = spec(&[("w", DType::F32, &[3])]);
        let cases = [
            (
                "krum",
                5,
                "krum needs more than 2f + 2 = 6 updates (f = 2); the round has 5",
                7,
            ),
            (
                "multi_krum",
                6,
                "multi_krum needs more than 2f + 2 = 6 updates (f = 2); the round has 6",
                7,
            ),
            (
                "bulyan",
                10,
                "bulyan needs at least 4f + 3 = 11 updates (f = 2); the round has 10",
                11,
            ),
        ];
        for (name, n, reason, enough) in cases {
            let strategy = strategy(name, &[("f", 2.0)]);
            assert_eq!(
                run(strategy.as_ref(), &spec, round_of(&spec, n)),
                Err(reason.to_string())
            );
            for n in 1..enough {
                assert!(
                    run(strategy.as_ref(), &spec, round_of(&spec, n)).is_err(),
                    "{name} {n}"
                );
            }
            assert!(
                run(strategy.as_ref(), &spec, round_of(&spec, enough)).is_ok(),
                "{name}"
            );
        }
    }

    #[test]
    fn multi_krum_with_m_above_n_minus_f_fails_the_round() {
        let spec = spec(&[("w", DType::F32, &[3])]);
        let strategy = strategy("multi_krum", &[("m", 9.0)]);
        assert_eq!(
            run(strategy.as_ref(), &spec, round_of(&spec, 9)),
            Err("multi_krum averages m = 9 updates, more than n - f = 8 (n = 9, f = 1)".into())
        );
        assert!(run(strategy.as_ref(), &spec, round_of(&spec, 10)).is_ok());
    }

    #[test]
    fn an_empty_round_fails_with_a_reason_for_every_rule() {
        let spec = spec(&[("w", DType::F32, &[3])]);
        for name in ["median", "trimmed_mean", "krum", "multi_krum", "bulyan"] {
            let error = run(strategy(name, &[]).as_ref(), &spec, Vec::new()).unwrap_err();
            assert!(error.contains("no update was added"), "{name}: {error}");
        }
    }

    #[test]
    fn options_out_of_range_are_refused_by_name() {
        let cases: [(&str, &str, f64); 9] = [
            ("trimmed_mean", "beta", 0.5),
            ("trimmed_mean", "beta", 0.7),
            ("trimmed_mean", "beta", -0.1),
            ("trimmed_mean", "beta", f64::NAN),
            ("krum", "f", 1.5),
            ("krum", "f", -1.0),
            ("multi_krum", "m", 0.0),
            ("multi_krum", "f", 2.5),
            ("bulyan", "f", 1e9),
        ];
        for (name, option, value) in cases {
            let error = build(
                name,
                options(&[(option, value)]),
                AccumulatorOptions::default(),
            )
            .unwrap_err();
            assert_eq!(
                error.key,
                format!("aggregation.options.{option}"),
                "{name} {value}"
            );
            assert_eq!(error.value, Some(value.to_string()), "{name}");
        }
        let error = TrimmedMean::from_options(&mut options(&[("beta", 0.5)])).unwrap_err();
        assert_eq!(
            error.to_string(),
            "aggregation.options.beta = 0.5: must be a finite number from 0 up to, but not including, 0.5"
        );
        let beta = TrimmedMean::from_options(&mut options(&[("beta", 0.49)])).unwrap();
        assert_eq!(beta.beta(), 0.49);
        let multi = MultiKrum::from_options(&mut options(&[("f", 0.0), ("m", 3.0)])).unwrap();
        assert_eq!((multi.f(), multi.m()), (0, Some(3)));
        assert_eq!(Krum::from_options(&mut Options::none()).unwrap().f(), 1);
        assert_eq!(Bulyan::from_options(&mut Options::none()).unwrap().f(), 1);
    }

    #[test]
    fn unknown_options_are_refused_through_build() {
        let cases = [
            ("median", "beta"),
            ("trimmed_mean", "f"),
            ("krum", "m"),
            ("multi_krum", "beta"),
            ("bulyan", "m"),
        ];
        for (name, option) in cases {
            let error = build(
                name,
                options(&[(option, 1.0)]),
                AccumulatorOptions::default(),
            )
            .unwrap_err();
            assert_eq!(
                error.to_string(),
                format!("aggregation.options.{option}: is not an option of strategy \"{name}\"")
            );
        }
    }

    #[test]
    fn every_robust_rule_is_built_by_its_name_and_holds_updates() {
        for name in ["median", "trimmed_mean", "krum", "multi_krum", "bulyan"] {
            assert!(crate::strategy::NATIVE.contains(&name), "{name}");
            let strategy = strategy(name, &[]);
            assert_eq!(strategy.name(), name);
            assert!(strategy.holds_updates(), "{name}");
        }
    }

    #[test]
    fn an_update_that_does_not_fit_is_refused_and_not_held() {
        let global = spec(&[("w", DType::F32, &[3])]);
        let round = strategy("median", &[]).begin_round(RoundStart {
            prefix: 0,
            ..RoundStart::bare(1, global.clone())
        });
        let wrong_shape = spec(&[("w", DType::F32, &[4])]);
        assert!(
            round
                .add(update(&wrong_shape, "a", &[1.0; 4], false, 1.0))
                .is_err()
        );
        let mut short = update(&global, "b", &[1.0; 3], false, 1.0);
        short.data = short.data.slice(..8);
        assert_eq!(
            round.add(short),
            Err(ModelMismatch::MissingTensor("w".into()))
        );
        let mut long = update(&global, "c", &[1.0; 3], false, 1.0);
        long.data = [&long.data[..], &[0u8; 4]].concat().into();
        assert!(round.add(long).is_err());
        assert_eq!(round.updates(), 0);
        round
            .add(update(&global, "d", &[1.0, 2.0, 3.0], false, 1.0))
            .unwrap();
        assert_eq!(round.updates(), 1);
        let model = round.finalize(None).unwrap().model;
        assert_eq!(decode_values(DType::F32, model.data()), vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn a_mean_that_overflows_fails_as_not_finite() {
        // Finite f64 values whose sum is not: nothing is trimmed from two updates.
        let spec = spec(&[("w", DType::F64, &[2])]);
        let round = vec![
            update(&spec, "a", &[1.5e308, 1.0], false, 1.0),
            update(&spec, "b", &[1.5e308, 1.0], false, 1.0),
        ];
        let trimmed = strategy("trimmed_mean", &[("beta", 0.0)]);
        assert_eq!(
            run(trimmed.as_ref(), &spec, round),
            Err(NOT_FINITE.to_string())
        );
        // The median halves before it adds.
        let round = vec![
            update(&spec, "a", &[1.5e308, 1.0], false, 1.0),
            update(&spec, "b", &[1.5e308, 1.0], false, 1.0),
        ];
        assert_eq!(
            run(strategy("median", &[]).as_ref(), &spec, round),
            Ok(vec![1.5e308, 1.0])
        );
    }

    #[derive(Clone, Copy, Debug)]
    enum Attack {
        /// An honest-looking update scaled by 1e6.
        Scaled,
        /// Random values of a thousand times the honest norm.
        Noise,
    }

    /// `n` updates of `len` f32 values around 1.0, those at `byzantine` replaced by `attack`;
    /// and the mean of the honest ones.
    fn byzantine_round(n: usize, attack: Attack, seed: u64) -> (ModelSpec, Vec<Update>, Vec<f64>) {
        const LEN: usize = 1000;
        const BYZANTINE: [usize; 2] = [3, 7];
        let spec = spec(&[("w", DType::F32, &[LEN])]);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut honest = Vec::new();
        let updates = (0..n)
            .map(|i| {
                let around_one: Vec<f64> = (0..LEN)
                    .map(|_| f64::from((1.0 + rng.random_range(-1e-3..1e-3)) as f32))
                    .collect();
                let values = if !BYZANTINE.contains(&i) {
                    honest.push(around_one.clone());
                    around_one
                } else {
                    match attack {
                        Attack::Scaled => around_one.iter().map(|v| v * 1e6).collect(),
                        Attack::Noise => {
                            (0..LEN).map(|_| rng.random_range(-100.0..100.0)).collect()
                        }
                    }
                };
                update(&spec, &format!("p{i:02}"), &values, false, 1.0)
            })
            .collect();
        let honest: Vec<&Vec<f64>> = honest.iter().collect();
        (spec, updates, reference_mean(&honest))
    }

    fn within_one_percent(got: &[f64], honest: &[f64]) -> bool {
        got.iter()
            .zip(honest)
            .all(|(g, h)| (g - h).abs() <= 0.01 * h.abs())
    }

    fn byzantine_check(attack: Attack) {
        let rules: [(&str, Pairs, usize); 5] = [
            ("median", &[], 10),
            ("trimmed_mean", &[("beta", 0.2)], 10),
            ("krum", &[("f", 2.0)], 10),
            ("multi_krum", &[("f", 2.0)], 10),
            ("bulyan", &[("f", 2.0)], 11),
        ];
        for (name, pairs, n) in rules {
            let (spec, updates, honest) = byzantine_round(n, attack, 11);
            let got = run(strategy(name, pairs).as_ref(), &spec, updates).unwrap();
            assert!(
                within_one_percent(&got, &honest),
                "{name} moved by {attack:?}"
            );
        }
        let (spec, updates, honest) = byzantine_round(10, attack, 11);
        let fedavg = run(&FedAvg::default(), &spec, updates).unwrap();
        assert!(
            !within_one_percent(&fedavg, &honest),
            "FedAvg resisted {attack:?}?"
        );
    }

    #[test]
    fn updates_scaled_by_a_million_move_fedavg_but_no_robust_rule() {
        byzantine_check(Attack::Scaled);
    }

    #[test]
    fn large_random_noise_moves_fedavg_but_no_robust_rule() {
        byzantine_check(Attack::Noise);
    }
}
