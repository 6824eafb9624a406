//! The robust rules' finalize on `n` f32 updates of one model: what closing a round costs
//! once every update is in.
//!
//!     cargo bench -p rondo-core --bench robust
//!     RONDO_BENCH_MB=100 RONDO_BENCH_N=10,50,100 cargo bench -p rondo-core --bench robust
//!
//! `RONDO_BENCH_MB` is the model's size (default 10), `RONDO_BENCH_N` the update counts
//! (default 10 and 50). The Krum family assumes `f = max(1, n / 10)` Byzantine updates, which
//! Bulyan's `n ≥ 4f + 3` allows at both defaults.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rondo_core::aggregate::{AccumulatorOptions, Update};
use rondo_core::model::{DType, ModelSpec, TensorSpec};
use rondo_core::strategy::{self, Options, RoundAggregation, RoundStart};

fn model_mb() -> f64 {
    std::env::var("RONDO_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10.0)
}

fn counts() -> Vec<usize> {
    std::env::var("RONDO_BENCH_N")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10, 50])
}

fn robust(c: &mut Criterion) {
    let len = (model_mb() * 1e6 / 4.0) as usize;
    let spec = ModelSpec {
        tensors: vec![TensorSpec {
            name: "w".into(),
            dtype: DType::F32,
            shape: vec![len],
        }],
    };
    for n in counts() {
        let updates: Vec<Bytes> = (0..n)
            .map(|k| {
                let mut rng = StdRng::seed_from_u64(k as u64);
                (0..len)
                    .flat_map(|_| rng.random_range(-1.0f32..1.0).to_le_bytes())
                    .collect::<Vec<u8>>()
                    .into()
            })
            .collect();
        let f = (n / 10).max(1) as f64;
        let rules: [(&str, Vec<(&str, f64)>); 5] = [
            ("median", vec![]),
            ("trimmed_mean", vec![("beta", 0.1)]),
            ("krum", vec![("f", f)]),
            ("multi_krum", vec![("f", f)]),
            ("bulyan", vec![("f", f)]),
        ];
        let mut group = c.benchmark_group(format!("robust_{n}x{}MB", model_mb()));
        group.sample_size(10);
        for (name, options) in rules {
            let options = Options::new(options.iter().map(|(k, v)| (k.to_string(), *v)).collect());
            let rule = strategy::build(name, options, AccumulatorOptions::default())
                .expect("valid options");
            // Untimed: a round holding every update (shared, not copied).
            let setup = || {
                let round = rule.begin_round(RoundStart {
                    prefix: 0,
                    ..RoundStart::bare(1, spec.clone())
                });
                for (k, data) in updates.iter().enumerate() {
                    round
                        .add(Update {
                            key: format!("u{k:06}"),
                            spec: spec.clone(),
                            data: data.clone(),
                            weight: 1.0,
                            metrics: Default::default(),
                        })
                        .expect("fits");
                }
                round
            };
            group.bench_function(name, |b| {
                b.iter_batched(
                    setup,
                    // Returned, so that the model is freed after the clock stops.
                    |round: Box<dyn RoundAggregation>| {
                        black_box(round.finalize(None).expect("a model"))
                    },
                    BatchSize::PerIteration,
                )
            });
        }
        group.finish();
    }
}

criterion_group!(benches, robust);
criterion_main!(benches);
