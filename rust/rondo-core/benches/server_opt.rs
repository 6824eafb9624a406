//! The close of a round: FedAvg's finalize against the server optimizers' (FedAvg's, then the
//! step from the previous model), on a model of `RONDO_BENCH_MB` MB of f32 (default 100) with
//! ten updates folded in. Only the finalize is timed; folding the updates is the same for all.
//!
//!     cargo bench -p rondo-core --bench server_opt
//!     RONDO_BENCH_MB=16 cargo bench -p rondo-core --bench server_opt   # a quicker run
//!
//! Best of a few runs each, the figure least disturbed by the rest of the machine.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rondo_core::aggregate::{AccumulatorOptions, Update};
use rondo_core::kernels::encode_values;
use rondo_core::model::{DType, ModelSpec, TensorSpec};
use rondo_core::strategy::{FedAvg, Options, RoundStart, Strategy, build};

const UPDATES: usize = 10;
const RUNS: usize = 5;
const PREFIX: usize = 8;

fn model_mb() -> usize {
    std::env::var("RONDO_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

/// Values that differ per element and per update, near the previous model's.
fn values(k: usize, len: usize) -> Vec<f64> {
    (0..len)
        .map(|i| ((i.wrapping_mul(31) + k * 17) % 1024) as f64 / 1024.0 - 0.5)
        .collect()
}

/// Best finalize time of `strategy` over [`RUNS`] rounds (after one untimed round, which makes
/// a server optimizer's state).
fn finalize_time(
    strategy: &dyn Strategy,
    spec: &ModelSpec,
    updates: &[Bytes],
    previous: &[u8],
) -> Duration {
    let mut best = Duration::MAX;
    for run in 0..=RUNS {
        let round = strategy.begin_round(RoundStart {
            prefix: PREFIX,
            ..RoundStart::bare(1, spec.clone())
        });
        for (k, data) in updates.iter().enumerate() {
            round
                .add(Update {
                    key: format!("p{k}"),
                    spec: spec.clone(),
                    data: data.clone(),
                    weight: (k + 1) as f64,
                    metrics: Default::default(),
                })
                .expect("shapes match");
        }
        let start = Instant::now();
        let model = round.finalize(Some(previous)).expect("a finite model");
        let time = start.elapsed();
        std::hint::black_box(&model);
        if run > 0 {
            best = best.min(time);
        }
    }
    best
}

fn main() {
    let len = model_mb() * 1_000_000 / 4;
    let spec = ModelSpec {
        tensors: vec![TensorSpec {
            name: "w".into(),
            dtype: DType::F32,
            shape: vec![len],
        }],
    };
    let updates: Vec<Bytes> = (0..UPDATES)
        .map(|k| Bytes::from(encode_values(DType::F32, &values(k + 1, len))))
        .collect();
    let previous = encode_values(DType::F32, &values(0, len));
    let accumulation = AccumulatorOptions::default();
    let fedavg = finalize_time(
        &FedAvg {
            options: accumulation,
        },
        &spec,
        &updates,
        &previous,
    );
    println!(
        "finalize {} MB f32, {UPDATES} updates, {} threads",
        model_mb(),
        rayon::current_num_threads()
    );
    println!("  fedavg   {:8.2} ms", fedavg.as_secs_f64() * 1e3);
    for name in ["fedavgm", "fedadam"] {
        let strategy = build(name, Options::none(), accumulation).expect("defaults are valid");
        let time = finalize_time(&*strategy, &spec, &updates, &previous);
        println!(
            "  {name:<8} {:8.2} ms = {:.1}x fedavg",
            time.as_secs_f64() * 1e3,
            time.as_secs_f64() / fedavg.as_secs_f64()
        );
    }
}
