//! The aggregator as one shared object: the round book behind its lock, the staging limit, the
//! outbox to the coordinator and the metrics. Both edges ([`crate::http`], [`crate::link`]) hold
//! an `Arc<Aggregator>`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use rondo_core::federation::AggregationResult;
use tokio::sync::Semaphore;

use crate::link::{Notice, Outbox};
use crate::rounds::RoundBook;

pub struct Metrics {
    pub registry: Registry,
    pub updates_accepted: IntCounter,
    pub updates_rejected: IntCounterVec,
    pub bytes_received: IntCounter,
    pub rounds_closed: IntCounterVec,
    pub finalize_seconds: Histogram,
    pub model_bytes: IntGauge,
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new_custom(Some("rondo_aggregator".into()), None)
            .expect("static prefix is valid");
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
        let model_bytes =
            IntGauge::new("model_bytes", "Size of the serialized global model").expect("valid");
        for metric in [
            Box::new(updates_accepted.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(updates_rejected.clone()),
            Box::new(bytes_received.clone()),
            Box::new(rounds_closed.clone()),
            Box::new(finalize_seconds.clone()),
            Box::new(model_bytes.clone()),
        ] {
            registry.register(metric).expect("metric names are unique");
        }
        Self {
            registry,
            updates_accepted,
            updates_rejected,
            bytes_received,
            rounds_closed,
            finalize_seconds,
            model_bytes,
        }
    }
}

pub struct Aggregator {
    book: Mutex<RoundBook>,
    /// Bounds how many uploads are staged in memory at once.
    pub staging: Semaphore,
    pub outbox: Outbox,
    pub metrics: Metrics,
    pub public_url: String,
    pub max_body_bytes: u64,
}

impl Aggregator {
    pub fn new(
        book: RoundBook,
        max_concurrent_uploads: usize,
        outbox: Outbox,
        public_url: String,
        max_body_bytes: u64,
    ) -> Arc<Self> {
        let metrics = Metrics::new();
        if let Some(model) = book.model() {
            metrics.model_bytes.set(model.file.len() as i64);
        }
        Arc::new(Self {
            book: Mutex::new(book),
            staging: Semaphore::new(max_concurrent_uploads),
            outbox,
            metrics,
            public_url,
            max_body_bytes,
        })
    }

    pub fn book(&self) -> MutexGuard<'_, RoundBook> {
        // A panic while holding the lock cannot leave the book half-updated (every mutation is
        // a single assignment after the fallible work), so a poisoned lock is still usable.
        self.book
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Closes a round and reports the result to the coordinator. Blocking: the finalize pass
    /// reads the whole sum, so callers run it on a blocking thread.
    pub fn close_round_blocking(&self, round: u32, attempt: u32) -> Result<(), String> {
        let started = Instant::now();
        let mut book = self.book();
        let already_closed = book.open_round_id() != Some((round, attempt));
        let result = book.close_round(round, attempt)?;
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
