//! The aggregator as one shared object: the round book behind its lock, the staging pool, the
//! outbox to the coordinator and the metrics. Both edges ([`crate::http`], [`crate::link`]) hold
//! an `Arc<Aggregator>`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use rondo_core::federation::AggregationResult;

use crate::link::{Notice, Outbox};
use crate::rounds::{CommitsInFlight, RoundBook};
use crate::staging::StagingPool;
use crate::wire::UploadLimits;

pub struct Metrics {
    pub registry: Registry,
    pub updates_accepted: IntCounter,
    pub updates_rejected: IntCounterVec,
    pub bytes_received: IntCounter,
    pub rounds_closed: IntCounterVec,
    pub finalize_seconds: Histogram,
    pub fold_seconds: Histogram,
    pub model_bytes: IntGauge,
    pub staging_pool_idle_bytes: IntGauge,
}

impl Metrics {
    fn new() -> Self {
        let updates_accepted = IntCounter::new(
            "updates_accepted_total",
            "Updates folded into a round's sum",
        )
        .expect("valid metric");
        let updates_rejected = IntCounterVec::new(
            Opts::new("updates_rejected_total", "Uploads refused, by error code"),
            &["code"],
        )
        .expect("valid metric");
        let bytes_received =
            IntCounter::new("upload_bytes_total", "Bytes of accepted uploads").expect("valid");
        let rounds_closed = IntCounterVec::new(
            Opts::new("rounds_closed_total", "Rounds closed, by outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        let finalize_seconds = Histogram::with_opts(HistogramOpts::new(
            "finalize_seconds",
            "Time to turn a round's sum into the next global model",
        ))
        .expect("valid metric");
        let fold_seconds = Histogram::with_opts(HistogramOpts::new(
            "fold_seconds",
            "Time to fold one validated update into the running sum (waiting for the sum included)",
        ))
        .expect("valid metric");
        let model_bytes =
            IntGauge::new("model_bytes", "Size of the serialized global model").expect("valid");
        let staging_pool_idle_bytes = IntGauge::new(
            "staging_pool_idle_bytes",
            "Staging memory kept in idle buffers for the next uploads",
        )
        .expect("valid metric");
        let registry = rondo_net::api::registry(
            "rondo_aggregator",
            vec![
                Box::new(updates_accepted.clone()),
                Box::new(updates_rejected.clone()),
                Box::new(bytes_received.clone()),
                Box::new(rounds_closed.clone()),
                Box::new(finalize_seconds.clone()),
                Box::new(fold_seconds.clone()),
                Box::new(model_bytes.clone()),
                Box::new(staging_pool_idle_bytes.clone()),
            ],
        );
        Self {
            registry,
            updates_accepted,
            updates_rejected,
            bytes_received,
            rounds_closed,
            finalize_seconds,
            fold_seconds,
            model_bytes,
            staging_pool_idle_bytes,
        }
    }
}

pub struct Aggregator {
    book: Mutex<RoundBook>,
    /// Bounds the bytes of uploads held in memory at once, whatever the number of
    /// participants, and keeps their buffers for the next uploads.
    pub staging: StagingPool,
    pub outbox: Outbox,
    pub metrics: Metrics,
    pub public_url: String,
    pub max_body_bytes: u64,
    pub upload_idle_timeout: std::time::Duration,
    pub limits: UploadLimits,
}

impl Aggregator {
    pub fn new(
        book: RoundBook,
        staging_memory_bytes: u64,
        outbox: Outbox,
        public_url: String,
        max_body_bytes: u64,
        upload_idle_timeout: std::time::Duration,
        limits: UploadLimits,
    ) -> Arc<Self> {
        let metrics = Metrics::new();
        if let Some(model) = book.model() {
            metrics.model_bytes.set(model.file.len() as i64);
        }
        // Deterministic mode holds every update until the round closes: a pooled buffer would
        // hold its share of the budget as long, and uploads would stall once the held updates
        // filled it.
        let reuse = !book.options().deterministic;
        let staging = StagingPool::new(
            staging_memory_bytes,
            reuse,
            metrics.staging_pool_idle_bytes.clone(),
        );
        Arc::new(Self {
            book: Mutex::new(book),
            staging,
            outbox,
            metrics,
            public_url,
            max_body_bytes,
            upload_idle_timeout,
            limits,
        })
    }

    pub fn book(&self) -> MutexGuard<'_, RoundBook> {
        // A panic while holding the lock cannot leave the book half-updated (every mutation is
        // a single assignment after the fallible work), so a poisoned lock is still usable.
        self.book
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Closes a round and reports the result to the coordinator. Blocking: it waits for folds
    /// in flight, and the finalize pass reads the whole sum, so callers run it on a blocking
    /// thread.
    pub fn close_round_blocking(&self, round: u32, attempt: u32) -> Result<(), String> {
        let started = Instant::now();
        let (already_closed, result) = loop {
            let mut book = self.book();
            let already_closed = book.open_round_id() != Some((round, attempt));
            match book.close_round(round, attempt) {
                Ok(result) => break (already_closed, result?),
                // Folds take milliseconds; new ones are refused meanwhile, so this ends.
                Err(CommitsInFlight) => {
                    drop(book);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        };
        let book = self.book();
        if !already_closed {
            self.metrics
                .finalize_seconds
                .observe(started.elapsed().as_secs_f64());
            let outcome = match &result {
                AggregationResult::Aggregated { .. } => "aggregated",
                AggregationResult::Failed { .. } => "failed",
            };
            self.metrics
                .rounds_closed
                .with_label_values(&[outcome])
                .inc();
            if let Some(model) = book.model() {
                self.metrics.model_bytes.set(model.file.len() as i64);
            }
            tracing::info!(
                round,
                attempt,
                ?result,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "round closed"
            );
        }
        drop(book);
        self.outbox.send(Notice::RoundAggregated {
            round,
            attempt,
            result,
        });
        Ok(())
    }
}
