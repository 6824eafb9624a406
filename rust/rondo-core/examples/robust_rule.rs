//! Times one robust rule's finalize on `n` f32 updates, for comparison with other
//! implementations (`bench/robust_vs_flower.py`). Prints one JSON line:
//! `{"rule", "n", "mb", "secs", "peak_rss_mb"}`, `secs` the median of three finalizes and
//! `peak_rss_mb` the process's peak resident memory (`VmHWM`, MiB).
//!
//!     cargo run --release -p rondo-core --example robust_rule -- --rule median --n 10 --mb 10 \
//!         [--f 2] [--beta 0.1] [--m 5] [--seed 1] [--write-updates DIR] [--read-updates DIR] \
//!         [--write-result FILE]
//!
//! Updates are seeded uniform values in [-1, 1), or read from `DIR/u0.f32`, `DIR/u1.f32`, …
//! (raw little-endian f32, all the same length). Their keys sort in file order (`u000000`, …),
//! so a tie goes to the lowest-numbered file. `--write-updates` and `--write-result` write
//! raw little-endian f32 in the same layout.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rondo_core::aggregate::{AccumulatorOptions, Update};
use rondo_core::model::{DType, ModelSpec, TensorSpec};
use rondo_core::strategy::{self, Options, RoundStart};

struct Args {
    rule: String,
    n: usize,
    mb: f64,
    options: BTreeMap<String, f64>,
    seed: u64,
    write_updates: Option<PathBuf>,
    read_updates: Option<PathBuf>,
    write_result: Option<PathBuf>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        rule: "median".into(),
        n: 10,
        mb: 10.0,
        options: BTreeMap::new(),
        seed: 1,
        write_updates: None,
        read_updates: None,
        write_result: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<f64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--rule" => args.rule = value()?,
            "--n" => args.n = value()?.parse().map_err(|e| format!("--n: {e}"))?,
            "--mb" => args.mb = number(value()?)?,
            "--f" | "--beta" | "--m" => {
                let v = number(value()?)?;
                args.options.insert(flag[2..].to_string(), v);
            }
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--write-updates" => args.write_updates = Some(value()?.into()),
            "--read-updates" => args.read_updates = Some(value()?.into()),
            "--write-result" => args.write_result = Some(value()?.into()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn random_update(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len)
        .flat_map(|_| rng.random_range(-1.0f32..1.0).to_le_bytes())
        .collect()
}

/// Peak resident memory so far, in MiB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn run() -> Result<(), String> {
    let args = parse()?;
    let updates: Vec<Bytes> = match &args.read_updates {
        Some(dir) => (0..args.n)
            .map(|k| {
                let path = dir.join(format!("u{k}.f32"));
                std::fs::read(&path)
                    .map(Bytes::from)
                    .map_err(|e| format!("{}: {e}", path.display()))
            })
            .collect::<Result<_, _>>()?,
        None => {
            let len = (args.mb * 1e6 / 4.0).round() as usize;
            (0..args.n)
                .map(|k| Bytes::from(random_update(len, args.seed.wrapping_mul(1000) + k as u64)))
                .collect()
        }
    };
    let bytes = updates.first().map_or(0, Bytes::len);
    let values = bytes / 4;
    if values * 4 != bytes || updates.iter().any(|u| u.len() != bytes) {
        return Err("every update must be the same whole number of f32 values".into());
    }
    if let Some(dir) = &args.write_updates {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for (k, u) in updates.iter().enumerate() {
            let path = dir.join(format!("u{k}.f32"));
            std::fs::write(&path, u).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let spec = ModelSpec {
        tensors: vec![TensorSpec {
            name: "w".into(),
            dtype: DType::F32,
            shape: vec![values],
        }],
    };
    let rule = strategy::build(
        &args.rule,
        Options::new(args.options.clone()),
        AccumulatorOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    let mut times = Vec::new();
    let mut result = None;
    for _ in 0..3 {
        let round = rule.begin_round(RoundStart {
            prefix: 0,
            ..RoundStart::bare(1, spec.clone())
        });
        for (k, data) in updates.iter().enumerate() {
            round
                .add(Update {
                    key: format!("u{k:06}"),
                    spec: spec.clone(),
                    // A clone of `Bytes` shares the buffer: every round holds the same memory.
                    data: data.clone(),
                    weight: 1.0,
                    metrics: Default::default(),
                })
                .map_err(|e| e.to_string())?;
        }
        drop(result.take());
        let start = Instant::now();
        let finalized = round.finalize(None)?;
        times.push(start.elapsed().as_secs_f64());
        result = Some(finalized.model);
    }
    times.sort_by(f64::total_cmp);
    if let (Some(path), Some(model)) = (&args.write_result, &result) {
        std::fs::write(path, model.data()).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    // Written by hand to keep the keys in this order.
    let peak = peak_rss_mb().map_or("null".to_string(), |mb| format!("{mb:.1}"));
    println!(
        "{{\"rule\":{},\"n\":{},\"mb\":{},\"secs\":{:.6},\"peak_rss_mb\":{peak}}}",
        serde_json::Value::from(args.rule.as_str()),
        updates.len(),
        bytes as f64 / 1e6,
        times[times.len() / 2],
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("robust_rule: {error}");
            ExitCode::FAILURE
        }
    }
}
