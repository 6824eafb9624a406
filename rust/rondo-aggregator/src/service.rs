//! The aggregator as one shared object: the round book behind its lock, the staging pool, the
//! outbox to the coordinator and the metrics. Both edges ([`crate::http`], [`crate::link`]) hold
//! an `Arc<Aggregator>`.
//!
//! The two state changes that must complete whatever happens to the request or call that
//! started them run here, on blocking threads tracked by the process's [`Shutdown`]:
//! [`Aggregator::commit`] (fold an update and record it, or roll back) and
//! [`Aggregator::close_round_blocking`] (wait, boundedly, for folds in flight; finalize off the
//! book's lock; keep the new model in the model store, also off the lock; record and report
//! the result).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, MutexGuard};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use rondo_core::aggregate::Update;
use rondo_core::federation::AggregationResult;
use rondo_core::model::ModelSpec;
use rondo_net::shutdown::Shutdown;

use rondo_net::link::Notice;

use crate::durable::{Durable, SavedUpdateInput};
use crate::link::Outbox;
use crate::models::{ModelStore, NewModel, Source};
use crate::output::ModelOutput;
use crate::rounds::{Closing, CommitError, FinalizedRound, Grant, RoundBook, RoundSum};
use crate::staging::StagingPool;
use crate::wire::UploadLimits;

/// Buckets for transfers, folds and closes: from a millisecond to ten minutes.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

fn histogram(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec()))
        .expect("valid metric")
}

/// The aggregator's metrics (`docs/metrics.md` describes each). Each is touched once per
/// request, fold, download or close, never per byte.
pub struct Metrics {
    pub registry: Registry,
    pub updates_accepted: IntCounter,
    pub updates_rejected: IntCounterVec,
    pub refused: IntCounterVec,
    pub bytes_received: IntCounter,
    pub upload_seconds: HistogramVec,
    pub download_bytes: IntCounter,
    pub download_seconds: Histogram,
    pub downloads_aborted: IntCounter,
    pub rounds_closed: IntCounterVec,
    pub close_seconds: Histogram,
    pub finalize_seconds: Histogram,
    pub fold_seconds: Histogram,
    pub folded_bytes: IntCounter,
    pub model_bytes: IntGauge,
    pub model_round: IntGauge,
    pub staging_budget_bytes: IntGauge,
    pub staging_reserved_bytes: IntGauge,
    pub staging_pool_idle_bytes: IntGauge,
    pub store_seconds: Histogram,
    pub store_errors: IntCounter,
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
        let refused = rondo_net::api::refused_counter();
        let bytes_received =
            IntCounter::new("upload_bytes_total", "Bytes of accepted uploads").expect("valid");
        let upload_seconds = HistogramVec::new(
            HistogramOpts::new(
                "upload_duration_seconds",
                "Uploads from the request to the answer (waiting for staging memory included), \
                 by outcome",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["outcome"],
        )
        .expect("valid metric");
        let download_bytes = IntCounter::new(
            "download_bytes_total",
            "Bytes of global models handed to connections (downloads of the current and of kept models)",
        )
        .expect("valid metric");
        let download_seconds = histogram(
            "download_duration_seconds",
            "Complete model downloads, from the request to the last byte handed to the connection",
        );
        let downloads_aborted = IntCounter::new(
            "downloads_aborted_total",
            "Model downloads whose client went away before the last byte",
        )
        .expect("valid metric");
        let rounds_closed = IntCounterVec::new(
            Opts::new("rounds_closed_total", "Rounds closed, by outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        let close_seconds = histogram(
            "close_duration_seconds",
            "Round closes, from the request to the result (waiting for folds in flight included)",
        );
        let finalize_seconds = histogram(
            "finalize_duration_seconds",
            "The finalize pass that turns a round's aggregation into the next global model",
        );
        let fold_seconds = histogram(
            "fold_duration_seconds",
            "Time to fold one validated update into the running sum (waiting for the sum included)",
        );
        let folded_bytes = IntCounter::new(
            "folded_bytes_total",
            "Bytes of updates folded into rounds' aggregations",
        )
        .expect("valid metric");
        let model_bytes = IntGauge::new("model_size_bytes", "Size of the serialized global model")
            .expect("valid");
        let model_round = IntGauge::new(
            "model_round",
            "Round of the global model held (-1 before round 0 closes)",
        )
        .expect("valid");
        let staging_budget_bytes = IntGauge::new(
            "staging_budget_bytes",
            "Staging memory for uploads (aggregation.staging_memory_bytes, in whole MiB)",
        )
        .expect("valid");
        let staging_reserved_bytes = IntGauge::new(
            "staging_reserved_bytes",
            "Staging memory held by uploads in flight and idle buffers",
        )
        .expect("valid");
        let staging_pool_idle_bytes = IntGauge::new(
            "staging_idle_bytes",
            "Staging memory kept in idle buffers for the next uploads",
        )
        .expect("valid metric");
        let store_seconds = histogram(
            "model_store_write_duration_seconds",
            "Writing one global model and its manifest to the model store, fsyncs included",
        );
        let store_errors = IntCounter::new(
            "model_store_errors_total",
            "Global models the model store could not write (each failed its round)",
        )
        .expect("valid metric");
        model_round.set(-1);
        // Known label values are exposed from the start, so that their rates are 0, not absent.
        for outcome in ["aggregated", "failed"] {
            rounds_closed.with_label_values(&[outcome]);
        }
        for outcome in ["accepted", "refused"] {
            upload_seconds.with_label_values(&[outcome]);
        }
        let registry = rondo_net::api::registry(
            "rondo_aggregator",
            vec![
                Box::new(updates_accepted.clone()),
                Box::new(updates_rejected.clone()),
                Box::new(refused.clone()),
                Box::new(bytes_received.clone()),
                Box::new(upload_seconds.clone()),
                Box::new(download_bytes.clone()),
                Box::new(download_seconds.clone()),
                Box::new(downloads_aborted.clone()),
                Box::new(rounds_closed.clone()),
                Box::new(close_seconds.clone()),
                Box::new(finalize_seconds.clone()),
                Box::new(fold_seconds.clone()),
                Box::new(folded_bytes.clone()),
                Box::new(model_bytes.clone()),
                Box::new(model_round.clone()),
                Box::new(staging_budget_bytes.clone()),
                Box::new(staging_reserved_bytes.clone()),
                Box::new(staging_pool_idle_bytes.clone()),
                Box::new(store_seconds.clone()),
                Box::new(store_errors.clone()),
            ],
        );
        Self {
            registry,
            updates_accepted,
            updates_rejected,
            refused,
            bytes_received,
            upload_seconds,
            download_bytes,
            download_seconds,
            downloads_aborted,
            rounds_closed,
            close_seconds,
            finalize_seconds,
            fold_seconds,
            folded_bytes,
            model_bytes,
            model_round,
            staging_budget_bytes,
            staging_reserved_bytes,
            staging_pool_idle_bytes,
            store_seconds,
            store_errors,
        }
    }
}

pub struct Aggregator {
    book: Mutex<RoundBook>,
    /// Signalled whenever a fold ends, for a close waiting on folds in flight.
    commit_ended: Condvar,
    /// Bounds the bytes of uploads held in memory at once, whatever the number of
    /// participants, and keeps their buffers for the next uploads.
    pub staging: StagingPool,
    pub outbox: Outbox,
    pub metrics: Metrics,
    pub public_url: String,
    pub max_body_bytes: u64,
    pub upload: crate::config::UploadPace,
    /// How long a close waits for folds in flight before failing the round.
    pub close_wait: Duration,
    pub shutdown: Shutdown,
    pub limits: UploadLimits,
    /// Where each new global model is written (`model.output_path`), if anywhere.
    pub output: Option<Arc<ModelOutput>>,
    /// Where accepted updates are saved before they are acknowledged, with a durable store.
    pub durable: Option<Durable>,
    /// Where every global model is kept (`store.data_dir`), if anywhere.
    pub model_store: Option<Arc<ModelStore>>,
    /// The training rounds' rule, for the stored manifests.
    strategy_name: &'static str,
}

/// An update read, validated and granted a commit, ready to fold.
pub struct Commit {
    pub grant: Grant,
    pub sum: RoundSum,
    pub spec: ModelSpec,
    pub data: Bytes,
    pub n_samples: u64,
    pub metrics: BTreeMap<String, f64>,
    /// `Some(digest)` for an update read back from the store after a restart: it is saved
    /// already.
    pub recovered: Option<String>,
}

/// Rolls a commit back if its fold never reports (it panicked).
struct CommitGuard<'a> {
    aggregator: &'a Aggregator,
    grant: &'a Grant,
    ended: bool,
}

impl Drop for CommitGuard<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.aggregator
                .book()
                .abort_commit(self.grant, "the fold panicked");
            self.aggregator.commit_ended.notify_all();
        }
    }
}

impl Aggregator {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        book: RoundBook,
        staging_memory_bytes: u64,
        outbox: Outbox,
        public_url: String,
        max_body_bytes: u64,
        upload: crate::config::UploadPace,
        close_wait: Duration,
        shutdown: Shutdown,
        limits: UploadLimits,
        output: Option<Arc<ModelOutput>>,
        durable: Option<Durable>,
        model_store: Option<Arc<ModelStore>>,
    ) -> Arc<Self> {
        let metrics = Metrics::new();
        if let Some(model) = book.model() {
            metrics.model_bytes.set(model.file.len() as i64);
            metrics.model_round.set(i64::from(model.round));
        }
        // A rule that holds every update until the round closes would hold a pooled buffer as
        // long, and uploads would stall once the held updates filled the budget.
        let reuse = !book.strategy().holds_updates();
        let strategy_name = book.strategy().name();
        let staging = StagingPool::new(
            staging_memory_bytes,
            reuse,
            metrics.staging_pool_idle_bytes.clone(),
        );
        Arc::new(Self {
            book: Mutex::new(book),
            commit_ended: Condvar::new(),
            staging,
            outbox,
            metrics,
            public_url,
            max_body_bytes,
            upload,
            close_wait,
            shutdown,
            limits,
            output,
            durable,
            model_store,
            strategy_name,
        })
    }

    pub fn book(&self) -> MutexGuard<'_, RoundBook> {
        self.book.lock()
    }

    /// Folds a granted update into the round's sum and records it, then tells the
    /// coordinator. Blocking (the fold reads the whole update); run through
    /// [`Shutdown::spawn_blocking`] so that it completes even when the upload's request is
    /// dropped: the update is then counted exactly once, like any other, and both services
    /// hear of it. Returns whether it was recorded as accepted.
    pub fn commit(&self, commit: Commit) -> Result<(), CommitError> {
        let Commit {
            grant,
            sum,
            spec,
            data,
            n_samples,
            metrics,
            recovered,
        } = commit;
        // Its own thread: the upload's span does not follow, so the fold has one of its own.
        let _span = tracing::info_span!(
            "fold",
            round = grant.round,
            attempt = grant.attempt,
            participant = %grant.participant_id
        )
        .entered();
        let mut guard = CommitGuard {
            aggregator: self,
            grant: &grant,
            ended: false,
        };
        let started = Instant::now();
        let bytes = data.len() as u64;
        // Recoverable before it is folded: from here on the update is part of the round, even
        // if this process dies before it answers (a restart folds it back in).
        let saved = match (&self.durable, recovered.is_some()) {
            (Some(durable), false) => {
                let input = SavedUpdateInput {
                    participant_id: &grant.participant_id,
                    data: &data,
                    n_samples,
                    metrics: &metrics,
                    spec: &spec,
                };
                match durable.save_update(grant.round, grant.attempt, input) {
                    Ok(saved) => Some(saved),
                    Err(err) => {
                        drop(sum);
                        self.book().finish_commit(&grant, None);
                        guard.ended = true;
                        drop(guard);
                        self.commit_ended.notify_all();
                        tracing::error!(round = grant.round, participant = %grant.participant_id, %err, "an update could not be saved; refused");
                        let err = CommitError::Unsaved(err.to_string());
                        self.reject(&grant, err.code(), &err.to_string());
                        return Err(err);
                    }
                }
            }
            _ => None,
        };
        let folded = sum.add(Update {
            key: grant.participant_id.clone(),
            spec,
            data,
            weight: n_samples as f64,
            metrics: metrics.clone(),
        });
        // A close waits until no fold holds the sum.
        drop(sum);
        self.metrics
            .fold_seconds
            .observe(started.elapsed().as_secs_f64());
        if folded.is_ok() {
            self.metrics.folded_bytes.inc_by(bytes);
        } else if let (Some(durable), Some(saved)) = (&self.durable, &saved) {
            durable.unsave_update(grant.round, grant.attempt, saved);
        }
        let digest = saved.map(|s| s.sha256).or(recovered);
        let mut book = self.book();
        let recorded =
            book.finish_commit_saved(&grant, folded.is_ok().then_some(n_samples), digest);
        guard.ended = true;
        // Queued under the book's lock, so that it reaches the coordinator before the round's
        // "aggregated" notice, which a close can only send after taking the lock.
        if recorded {
            self.outbox.send(Notice::Accepted {
                round: grant.round,
                attempt: grant.attempt,
                participant_id: grant.participant_id.clone(),
                n_samples,
                metrics,
            });
        }
        drop(book);
        drop(guard);
        self.commit_ended.notify_all();
        let outcome = match folded {
            Err(mismatch) => Err(CommitError::Mismatch(mismatch.to_string())),
            Ok(()) if !recorded => Err(CommitError::RoundClosed),
            Ok(()) => Ok(()),
        };
        match &outcome {
            Ok(()) => {
                self.metrics.updates_accepted.inc();
                tracing::debug!(
                    round = grant.round,
                    participant = %grant.participant_id,
                    n_samples,
                    fold_ms = started.elapsed().as_secs_f64() * 1e3,
                    "update accepted"
                );
            }
            Err(err) => self.reject(&grant, err.code(), &err.to_string()),
        }
        outcome
    }

    /// Writes a round's new model to the model store, if there is one, before the round is
    /// recorded and reported, and off the book's lock: the coordinator moves on only once the
    /// model is durable. A model that cannot be kept fails its round (counted, logged, shown
    /// in the status): the previous model stays and the coordinator runs the round again, so
    /// that no round counts without its model on disk.
    fn keep_model(&self, finalized: FinalizedRound) -> FinalizedRound {
        let (Some(store), Some(model)) = (&self.model_store, finalized.produced()) else {
            return finalized;
        };
        let started = Instant::now();
        let stored = store.store(&NewModel {
            round: model.round,
            attempt: model.attempt,
            source: Source::Aggregated,
            // Round 0 is always the plain average of its uploads, whatever the rule.
            strategy: Some(if model.round == 0 {
                "fedavg"
            } else {
                self.strategy_name
            }),
            contributors: model.contributors,
            training_metrics: None,
            file: model.file,
        });
        self.metrics
            .store_seconds
            .observe(started.elapsed().as_secs_f64());
        match stored {
            Ok(_) => finalized,
            Err(err) => {
                self.metrics.store_errors.inc();
                let round = model.round;
                tracing::error!(
                    round,
                    "the model store could not keep the round's model; the round fails: {err:#}"
                );
                finalized.fail(format!(
                    "the model store could not keep the model of round {round}: {err:#}"
                ))
            }
        }
    }

    /// Counts a refused upload and tells the coordinator.
    pub fn reject(&self, grant: &Grant, code: &'static str, message: &str) {
        self.metrics
            .updates_rejected
            .with_label_values(&[code])
            .inc();
        self.outbox.send(Notice::Rejected {
            round: grant.round,
            attempt: grant.attempt,
            participant_id: grant.participant_id.clone(),
            reason: format!("{code}: {message}"),
        });
    }

    /// Closes a round and reports the result to the coordinator. Blocking: it waits (at most
    /// [`Aggregator::close_wait`]) for folds in flight, and the finalize pass reads the whole
    /// sum, off the book's lock so that downloads and status are served meanwhile.
    pub fn close_round_blocking(&self, round: u32, attempt: u32) -> Result<(), String> {
        let _span = tracing::info_span!("close", round, attempt).entered();
        let started = Instant::now();
        let give_up_at = started + self.close_wait;
        let closing = {
            let mut book = self.book();
            loop {
                match book.begin_close(round, attempt, Instant::now() >= give_up_at)? {
                    Closing::Closed(result) => {
                        drop(book);
                        self.outbox.send(Notice::RoundAggregated {
                            round,
                            attempt,
                            result,
                        });
                        return Ok(());
                    }
                    Closing::InProgress => return Ok(()),
                    Closing::CommitsInFlight { .. } => {
                        let wait = give_up_at
                            .saturating_duration_since(Instant::now())
                            .min(Duration::from_millis(100));
                        self.commit_ended.wait_for(&mut book, wait);
                    }
                    Closing::Ready(closing) => break closing,
                }
            }
        };
        let finalize_started = Instant::now();
        let finalized = closing.finalize();
        self.metrics
            .finalize_seconds
            .observe(finalize_started.elapsed().as_secs_f64());
        let finalized = self.keep_model(finalized);
        let mut book = self.book();
        let result = book.finish_close(finalized);
        self.metrics
            .close_seconds
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
            self.metrics.model_round.set(i64::from(model.round));
            if let (Some(output), AggregationResult::Aggregated { .. }) = (&self.output, &result) {
                output.publish(model.round, model.file.clone(), &self.shutdown);
            }
        }
        let strategy = book.strategy().clone();
        drop(book);
        // The rule's state after this round goes beside its model, so that a restarted
        // aggregator steps on from it rather than from zero.
        if let (Some(durable), AggregationResult::Aggregated { .. }) = (&self.durable, &result)
            && let Some(state) = strategy.saved_state()
            && let Err(err) = durable.save_strategy_state(round, &state)
        {
            tracing::warn!(round, %err, "the rule's state could not be saved; a restart would begin it again");
        }
        // The round is over (its model stored, or it failed): its saved updates go.
        if let Some(durable) = &self.durable {
            tokio::runtime::Handle::current().block_on(durable.forget_round(round, attempt));
        }
        tracing::info!(
            round,
            attempt,
            ?result,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "round closed"
        );
        self.outbox.send(Notice::RoundAggregated {
            round,
            attempt,
            result,
        });
        Ok(())
    }
}
