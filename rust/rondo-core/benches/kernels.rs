//! Aggregation kernels against the memory-bandwidth limit.
//!
//! Every group measures a plain parallel read-sum over the same input bytes in the same run and
//! prints each kernel's throughput as a fraction of it ("of read-sum"). Throughput counts the
//! bytes of the updates consumed, so 100% means "as fast as the bytes can be read at all".
//!
//!     cargo bench -p rondo-core --bench kernels
//!     RONDO_BENCH_MB=100 cargo bench -p rondo-core --bench kernels   # bigger vectors
//!
//! The modes group runs 1, 2, 4 and 8 uploaders concurrently into one accumulator and reports,
//! besides throughput, how far the result is from the exact (f64) weighted average.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rondo_core::aggregate::{AccumulationMode, AccumulatorOptions, FedAvgAccumulator, Update};
use rondo_core::kernels::{self, Term, encode_values};
use rondo_core::model::{DType, ModelSpec, TensorSpec};

/// Size of each update vector, in MB (default 64).
fn vector_mb() -> usize {
    std::env::var("RONDO_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

fn elements() -> usize {
    vector_mb() * 1_000_000 / 4
}

/// Update `k`: values that differ per element and per update, all exactly representable.
fn update_values(k: usize, len: usize) -> Vec<f64> {
    (0..len)
        .map(|i| ((i.wrapping_mul(31) + k * 17) % 1024) as f64 / 64.0 - 8.0)
        .collect()
}

fn updates(count: usize, dtype: DType) -> Vec<Vec<u8>> {
    (0..count)
        .map(|k| encode_values(dtype, &update_values(k, elements())))
        .collect()
}

/// Best wall time of `runs` calls: the figure least disturbed by the rest of the machine.
fn best_of(runs: usize, mut f: impl FnMut()) -> Duration {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .min()
        .expect("runs > 0")
}

fn gbps(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e9
}

fn read_sum_all(inputs: &[Vec<u8>]) -> f32 {
    inputs.iter().map(|b| kernels::read_sum_f32(b)).sum()
}

fn report(name: &str, bytes: usize, kernel: Duration, baseline: Duration) {
    println!(
        "ratio {name:<38} {:6.2} GB/s = {:5.1}% of read-sum ({:.2} GB/s)",
        gbps(bytes, kernel),
        100.0 * baseline.as_secs_f64() / kernel.as_secs_f64(),
        gbps(bytes, baseline),
    );
}

/// FedAvg of ten f32 updates, one pass (blocked) and one update per pass, vs reading them.
fn fedavg_f32(c: &mut Criterion) {
    let inputs = updates(10, DType::F32);
    let bytes: usize = inputs.iter().map(Vec::len).sum();
    let terms: Vec<Term> = inputs
        .iter()
        .enumerate()
        .map(|(k, b)| Term {
            bytes: b,
            dtype: DType::F32,
            weight: (k + 1) as f64,
        })
        .collect();
    let mut acc = vec![0f32; elements()];

    let mut group = c.benchmark_group("fedavg_f32_x10");
    group
        .sample_size(10)
        .throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("read_sum", |b| b.iter(|| black_box(read_sum_all(&inputs))));
    group.bench_function("fold_many_blocked", |b| {
        b.iter(|| kernels::fold_many_f32(black_box(&mut acc), &terms))
    });
    group.bench_function("fold_one_by_one", |b| {
        b.iter(|| {
            for term in &terms {
                kernels::fold_many_f32(black_box(&mut acc), std::slice::from_ref(term));
            }
        })
    });
    group.finish();

    let baseline = best_of(5, || {
        black_box(read_sum_all(&inputs));
    });
    let blocked = best_of(5, || kernels::fold_many_f32(&mut acc, &terms));
    let one_by_one = best_of(5, || {
        for term in &terms {
            kernels::fold_many_f32(&mut acc, std::slice::from_ref(term));
        }
    });
    report("f32 x10, blocked (one pass)", bytes, blocked, baseline);
    report("f32 x10, one update per pass", bytes, one_by_one, baseline);
}

/// Half-precision inputs, accumulated in f32.
fn fedavg_half(c: &mut Criterion) {
    for dtype in [DType::BF16, DType::F16] {
        let inputs = updates(4, dtype);
        let bytes: usize = inputs.iter().map(Vec::len).sum();
        let terms: Vec<Term> = inputs
            .iter()
            .map(|b| Term {
                bytes: b,
                dtype,
                weight: 2.0,
            })
            .collect();
        let mut acc = vec![0f32; elements()];
        let name = format!("fedavg_{dtype}_x4");
        let mut group = c.benchmark_group(&name);
        group
            .sample_size(10)
            .throughput(Throughput::Bytes(bytes as u64));
        group.bench_function("fold_many_blocked", |b| {
            b.iter(|| kernels::fold_many_f32(black_box(&mut acc), &terms))
        });
        group.finish();
        let baseline = best_of(5, || {
            black_box(read_sum_all(&inputs));
        });
        let blocked = best_of(5, || kernels::fold_many_f32(&mut acc, &terms));
        report(
            &format!("{dtype} x4 into f32, blocked"),
            bytes,
            blocked,
            baseline,
        );
    }
}

/// The three accumulation modes with 1, 2, 4, 8 concurrent uploaders, and each result's
/// distance from the exact average.
fn modes(c: &mut Criterion) {
    let len = elements();
    let spec = ModelSpec {
        tensors: vec![TensorSpec {
            name: "w".into(),
            dtype: DType::F32,
            shape: vec![len],
        }],
    };
    let inputs = updates(8, DType::F32);
    let values: Vec<Vec<f64>> = (0..8).map(|k| update_values(k, len)).collect();
    let mut group = c.benchmark_group("modes");
    group.sample_size(10);
    for uploaders in [1usize, 2, 4, 8] {
        let bytes = uploaders * len * 4;
        let exact: Vec<f64> = (0..len)
            .map(|i| {
                let sum: f64 = (0..uploaders).map(|k| (k + 1) as f64 * values[k][i]).sum();
                sum / (1..=uploaders).sum::<usize>() as f64
            })
            .collect();
        let baseline = best_of(3, || {
            black_box(read_sum_all(&inputs[..uploaders]));
        });
        for (mode, deterministic) in [
            (AccumulationMode::Blocked, false),
            (AccumulationMode::Locked, false),
            (AccumulationMode::Hogwild, false),
            (AccumulationMode::Blocked, true),
        ] {
            let label = if deterministic {
                "deterministic".to_string()
            } else {
                format!("{mode:?}").to_lowercase()
            };
            let options = AccumulatorOptions {
                mode,
                deterministic,
            };
            // Untimed: a fresh accumulator and each uploader's own copy of its update.
            let setup = || {
                let acc = FedAvgAccumulator::new(spec.clone(), options);
                let owned: Vec<Update> = inputs[..uploaders]
                    .iter()
                    .enumerate()
                    .map(|(k, data)| Update {
                        key: format!("p{k}"),
                        spec: spec.clone(),
                        data: bytes::Bytes::from(data.clone()),
                        weight: (k + 1) as f64,
                        metrics: Default::default(),
                    })
                    .collect();
                (acc, owned)
            };
            // Timed: the uploaders adding concurrently (deterministic mode does its folding at
            // finalize, so finalize is timed for every mode).
            let accumulate = |(acc, owned): (FedAvgAccumulator, Vec<Update>)| {
                std::thread::scope(|scope| {
                    for update in owned {
                        let acc = &acc;
                        scope.spawn(move || acc.add(update).expect("shapes match"));
                    }
                });
                acc.finalize().expect("updates were added")
            };
            group.throughput(Throughput::Bytes(bytes as u64));
            group.bench_function(format!("{label}/{uploaders}"), |b| {
                b.iter_batched(setup, accumulate, BatchSize::PerIteration)
            });
            let mut time = Duration::MAX;
            let mut error = 0.0f64;
            for _ in 0..3 {
                let input = setup();
                let start = Instant::now();
                let out = accumulate(input);
                time = time.min(start.elapsed());
                error = out
                    .data()
                    .chunks_exact(4)
                    .zip(&exact)
                    .map(|(x, e)| {
                        (f64::from(f32::from_le_bytes([x[0], x[1], x[2], x[3]])) - e).abs()
                    })
                    .fold(error, f64::max);
            }
            println!(
                "mode {label:<13} uploaders {uploaders}: {:6.2} GB/s = {:5.1}% of read-sum, \
                 max |error| vs exact average {error:.3e}",
                gbps(bytes, time),
                100.0 * baseline.as_secs_f64() / time.as_secs_f64(),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, fedavg_f32, fedavg_half, modes);
criterion_main!(benches);
