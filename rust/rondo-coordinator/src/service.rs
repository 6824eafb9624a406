//! The coordinator as one shared object: the federation state machine behind its lock, the
//! aggregator's public URL once known, a wake-up for the driver, and the metrics; and what the
//! state machine takes from the edge: the clock, and randomness from the OS.

use parking_lot::{Mutex, MutexGuard, RwLock};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};
use rand::TryRngCore;
use rand::rngs::OsRng;
use rondo_core::federation::{
    EvaluationSummary, Federation, FederationError, Joining, MAX_METRICS_PER_DELIVERY,
    ParticipantId, PhaseName, Timestamp, token_from,
};
use rondo_net::shutdown::Shutdown;
use rondo_net::store::{Snapshot, Store};
use tokio::sync::{Notify, watch};

/// Where the federation is saved in the store.
pub const FEDERATION_KEY: &str = "coordinator:federation";
/// How long a change that must be durable before it is acknowledged (a join, a notice) waits
/// for the store before the request is answered `503 store_unavailable`.
pub const STORE_WAIT: Duration = Duration::from_secs(5);

/// The OS's random source, as the `Rng` the state machine takes. Secrets and tokens come from
/// it directly, with no user-space generator in between.
pub fn os_rng() -> impl rand::Rng {
    OsRng.unwrap_err()
}

/// 256 random bits from the OS, hex-encoded.
pub fn random_token() -> String {
    token_from(&mut os_rng())
}

/// The wall clock when the coordinator started, advanced by the monotonic clock: timestamps
/// that mean something outside this process and never run backwards within it.
pub struct Clock {
    epoch_millis: u64,
    started: Instant,
}

impl Clock {
    fn new() -> Self {
        Self {
            epoch_millis: Self::wall_now().as_millis(),
            started: Instant::now(),
        }
    }

    /// The wall clock now, as the state machine counts time.
    pub fn wall_now() -> Timestamp {
        let millis = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Timestamp::from_millis(millis)
    }

    fn now(&self) -> Timestamp {
        let elapsed = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        Timestamp::from_millis(self.epoch_millis.saturating_add(elapsed))
    }
}

/// Buckets for round and phase durations: from a tenth of a second to an hour.
const ROUND_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// The coordinator's metrics (`docs/metrics.md` describes each). Counters are bumped where the
/// event happens; gauges that mirror the federation are read off it when scraped.
pub struct Metrics {
    pub registry: Registry,
    pub heartbeats: IntCounterVec,
    pub joins: IntCounter,
    pub refused: IntCounterVec,
    pub rounds_closed: IntCounterVec,
    pub round_duration: HistogramVec,
    pub phase_duration: HistogramVec,
    pub round: IntGauge,
    pub attempt: IntGauge,
    pub rounds_planned: IntGauge,
    pub phase: IntGaugeVec,
    pub participants: IntGaugeVec,
    pub aggregator_up: IntGauge,
    pub evaluation_reports: IntCounter,
    pub evaluation_round: IntGauge,
    pub evaluation_loss: Gauge,
    pub evaluation_metric: GaugeVec,
    /// The phase last seen and since when, for `phase_duration_seconds`.
    phase_clock: Mutex<(PhaseName, Instant)>,
}

impl Metrics {
    fn new() -> Self {
        let heartbeats = IntCounterVec::new(
            Opts::new(
                "heartbeats_total",
                "Heartbeats answered, by the action answered",
            ),
            &["action"],
        )
        .expect("valid");
        let joins = IntCounter::new("joins_total", "Participants joined").expect("valid");
        let refused = rondo_net::api::refused_counter();
        let rounds_closed = IntCounterVec::new(
            Opts::new("rounds_closed_total", "Round attempts closed, by outcome"),
            &["outcome"],
        )
        .expect("valid");
        let round_duration = HistogramVec::new(
            HistogramOpts::new(
                "round_duration_seconds",
                "Round attempts from opening to close, by outcome",
            )
            .buckets(ROUND_BUCKETS.to_vec()),
            &["outcome"],
        )
        .expect("valid");
        let phase_duration = HistogramVec::new(
            HistogramOpts::new(
                "phase_duration_seconds",
                "Time the federation spent in a phase, observed as it leaves it",
            )
            .buckets(ROUND_BUCKETS.to_vec()),
            &["phase"],
        )
        .expect("valid");
        let round = IntGauge::new("round", "Round being run (or next to run)").expect("valid");
        let attempt =
            IntGauge::new("round_attempt", "Attempt at the round being run").expect("valid");
        let rounds_planned = IntGauge::new(
            "federation_rounds",
            "Training rounds the federation runs (federation.rounds)",
        )
        .expect("valid");
        let phase = IntGaugeVec::new(
            Opts::new(
                "phase",
                "The federation's phase: 1 for the current one, 0 otherwise",
            ),
            &["phase"],
        )
        .expect("valid");
        let participants = IntGaugeVec::new(
            Opts::new("participants", "Participants by state"),
            &["state"],
        )
        .expect("valid");
        let aggregator_up = IntGauge::new(
            "aggregator_up",
            "1 while the RPC link to the aggregator is up, 0 otherwise",
        )
        .expect("valid");
        let evaluation_reports = IntCounter::new(
            "evaluation_reports_total",
            "Evaluations of a global model reported by participants",
        )
        .expect("valid");
        let evaluation_round = IntGauge::new(
            "evaluation_round",
            "Round of the global model evaluated last",
        )
        .expect("valid");
        let evaluation_loss = Gauge::new(
            "evaluation_loss",
            "Sample-weighted mean loss that participants reported for the model evaluated last",
        )
        .expect("valid");
        let evaluation_metric = GaugeVec::new(
            Opts::new(
                "evaluation_metric",
                "Sample-weighted mean of each metric reported for the model evaluated last",
            ),
            &["name"],
        )
        .expect("valid");
        // Every label value known in advance is exposed from the start (at 0), so that a rate
        // over a series that has not moved yet is 0, not absent.
        for each in PhaseName::ALL {
            phase.with_label_values(&[each.as_str()]).set(0);
        }
        for outcome in ["aggregated", "failed"] {
            rounds_closed.with_label_values(&[outcome]);
            round_duration.with_label_values(&[outcome]);
        }
        for action in ["standby", "train", "evaluate", "finish", "rejected"] {
            heartbeats.with_label_values(&[action]);
        }
        let registry = rondo_net::api::registry(
            "rondo_coordinator",
            vec![
                Box::new(heartbeats.clone()),
                Box::new(joins.clone()),
                Box::new(refused.clone()),
                Box::new(rounds_closed.clone()),
                Box::new(round_duration.clone()),
                Box::new(phase_duration.clone()),
                Box::new(round.clone()),
                Box::new(attempt.clone()),
                Box::new(rounds_planned.clone()),
                Box::new(phase.clone()),
                Box::new(participants.clone()),
                Box::new(aggregator_up.clone()),
                Box::new(evaluation_reports.clone()),
                Box::new(evaluation_round.clone()),
                Box::new(evaluation_loss.clone()),
                Box::new(evaluation_metric.clone()),
            ],
        );
        Self {
            registry,
            heartbeats,
            joins,
            refused,
            rounds_closed,
            round_duration,
            phase_duration,
            round,
            attempt,
            rounds_planned,
            phase,
            participants,
            aggregator_up,
            evaluation_reports,
            evaluation_round,
            evaluation_loss,
            evaluation_metric,
            phase_clock: Mutex::new((PhaseName::WaitingForAggregator, Instant::now())),
        }
    }

    /// The federation is in `phase` now: when that is a change, the time spent in the previous
    /// one is observed. Called wherever the phase may have changed (the driver's ticks, round
    /// notices, scrapes), so a phase's end is seen within a tick (200 ms) at worst.
    pub fn observe_phase(&self, phase: PhaseName) {
        let mut clock = self.phase_clock.lock();
        if clock.0 != phase {
            let now = Instant::now();
            self.phase_duration
                .with_label_values(&[clock.0.as_str()])
                .observe(now.duration_since(clock.1).as_secs_f64());
            *clock = (phase, now);
        }
    }

    /// A round attempt closed: `outcome` and how long it ran.
    pub fn observe_round_closed(&self, outcome: &str, duration_secs: Option<f64>) {
        self.rounds_closed.with_label_values(&[outcome]).inc();
        if let Some(secs) = duration_secs {
            self.round_duration
                .with_label_values(&[outcome])
                .observe(secs);
        }
    }

    /// A participant reported its evaluation of the model of `round`; `summary` is that
    /// model's evaluation so far.
    pub fn observe_evaluation(&self, round: u32, summary: &EvaluationSummary) {
        self.evaluation_reports.inc();
        if i64::from(round) < self.evaluation_round.get() {
            return; // a late report for an older model: the gauges show the newest
        }
        if i64::from(round) > self.evaluation_round.get() {
            self.evaluation_metric.reset();
        }
        self.evaluation_round.set(i64::from(round));
        self.evaluation_loss.set(summary.loss);
        // Metric names come from participants: a bounded number of series, whatever they send.
        for (name, value) in summary.metrics.iter().take(MAX_METRICS_PER_DELIVERY) {
            self.evaluation_metric
                .with_label_values(&[name])
                .set(*value);
        }
    }

    pub fn observe(&self, federation: &Federation, aggregator: &AggregatorHealth) {
        let phase = federation.phase_name();
        self.observe_phase(phase);
        for each in PhaseName::ALL {
            self.phase
                .with_label_values(&[each.as_str()])
                .set(i64::from(each == phase));
        }
        let (round, attempt) = federation.current_round();
        self.round.set(i64::from(round));
        self.attempt.set(i64::from(attempt));
        self.rounds_planned
            .set(i64::from(federation.settings().rounds));
        self.aggregator_up.set(i64::from(aggregator.connected));
        for (state, count) in crate::status::counts_by_state(federation) {
            self.participants
                .with_label_values(&[state.as_str()])
                .set(count as i64);
        }
    }
}

/// The aggregator's health as the coordinator sees it over the link (`aggregator` in the
/// status): the status page shows it, since a browser may not reach the aggregator itself (its
/// API sends no CORS headers, and in a container network its URL resolves only inside).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AggregatorHealth {
    /// The link is up: the last call was answered or only timed out, none broke it.
    pub connected: bool,
    /// Since the aggregator last answered a call; `None` before it ever did.
    pub last_answer_secs_ago: Option<f64>,
    /// Round of its global model at its last status answer (probed every second when the
    /// link is otherwise quiet); `None` when it has none.
    pub model_round: Option<u32>,
    /// The last failed call or connection attempt since the link was last attached.
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct LinkHealth {
    connected: bool,
    last_answer: Option<Instant>,
    model_round: Option<u32>,
    last_error: Option<String>,
}

pub struct Coordinator {
    federation: Mutex<Federation>,
    aggregator_url: RwLock<Option<String>>,
    link_health: Mutex<LinkHealth>,
    /// Pokes the driver to run a tick now (after an event that may close or open a round).
    pub wake: Notify,
    /// Bumped when a round opens or closes, which is when heartbeat answers change for
    /// everyone; long-polling heartbeats wait on it. (A single participant's delivery is not
    /// announced: it would wake every held heartbeat for one participant's news.)
    changes: watch::Sender<u64>,
    pub heartbeat_period_secs: f64,
    pub metrics: Metrics,
    clock: Clock,
    /// Saves the federation to the store (see [`Coordinator::persist_to`]); unset: nowhere.
    snapshot: OnceLock<Arc<Snapshot>>,
}

impl Coordinator {
    pub fn new(federation: Federation, heartbeat_period_secs: f64) -> Self {
        Self {
            federation: Mutex::new(federation),
            aggregator_url: RwLock::new(None),
            link_health: Mutex::new(LinkHealth::default()),
            wake: Notify::new(),
            changes: watch::Sender::new(0),
            heartbeat_period_secs,
            metrics: Metrics::new(),
            clock: Clock::new(),
            snapshot: OnceLock::new(),
        }
    }

    /// From now on the federation is saved to `store`: within [`Snapshot::SOFT_DELAY`] of a
    /// [`Coordinator::touch`], and before [`Coordinator::durable`] returns.
    pub fn persist_to(self: &Arc<Self>, store: Store, shutdown: &Shutdown) {
        let coordinator = Arc::downgrade(self);
        let render = Box::new(move || {
            let coordinator = coordinator
                .upgrade()
                .ok_or_else(|| "the coordinator stopped".to_string())?;
            let federation = coordinator.federation();
            serde_json::to_vec(&*federation).map_err(|e| e.to_string())
        });
        let snapshot = Snapshot::start(store, FEDERATION_KEY, render, shutdown);
        let _ = self.snapshot.set(snapshot);
    }

    /// The federation changed in a way worth saving soon (a heartbeat, a tick).
    pub fn touch(&self) {
        if let Some(snapshot) = self.snapshot.get() {
            snapshot.touch();
        }
    }

    /// The federation changed in a way that must survive a crash before it is acknowledged
    /// (a join hands out credentials; a notice, once answered, is not sent again): waits until
    /// it is saved, at most [`STORE_WAIT`].
    pub async fn durable(&self) -> Result<(), String> {
        match self.snapshot.get() {
            Some(snapshot) => snapshot.durable(STORE_WAIT).await,
            None => Ok(()),
        }
    }

    /// Now, as the state machine counts time.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Registers a participant under a fresh random id and secret, if the federation's join
    /// policy lets it in; returns them.
    pub fn join(&self, joining: Joining) -> Result<(ParticipantId, String), FederationError> {
        let mut federation = self.federation();
        loop {
            let id = uuid::Uuid::new_v4().to_string();
            let secret = random_token();
            match federation.join(id.clone(), &secret, joining.clone(), self.now()) {
                Ok(()) => return Ok((id, secret)),
                // 122 random bits collided: draw again.
                Err(FederationError::AlreadyJoined(_)) => continue,
                Err(refused) => return Err(refused),
            }
        }
    }

    pub fn federation(&self) -> MutexGuard<'_, Federation> {
        self.federation.lock()
    }

    /// Wakes long-polling heartbeats: the federation changed.
    pub fn changed(&self) {
        self.changes.send_modify(|version| *version += 1);
    }

    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn aggregator_url(&self) -> Option<String> {
        self.aggregator_url.read().clone()
    }

    pub fn set_aggregator_url(&self, url: String) {
        *self.aggregator_url.write() = Some(url);
    }

    /// The aggregator answered a call; `model_round` when the answer said which model it has.
    pub fn aggregator_answered(&self, model_round: Option<Option<u32>>) {
        let mut health = self.link_health.lock();
        health.connected = true;
        health.last_answer = Some(Instant::now());
        if let Some(round) = model_round {
            health.model_round = round;
        }
    }

    /// The link was (re)attached: earlier errors are history.
    pub fn aggregator_attached(&self, model_round: Option<u32>) {
        self.aggregator_answered(Some(model_round));
        self.link_health.lock().last_error = None;
    }

    /// A call failed; `broken` when the link is down (a timeout leaves it up).
    pub fn aggregator_failed(&self, error: String, broken: bool) {
        let mut health = self.link_health.lock();
        health.last_error = Some(error);
        if broken {
            health.connected = false;
        }
    }

    /// Tells the metrics the federation's phase now (see [`Metrics::observe_phase`]).
    pub fn observe_phase(&self) {
        let phase = self.federation().phase_name();
        self.metrics.observe_phase(phase);
    }

    pub fn aggregator_health(&self) -> AggregatorHealth {
        let health = self.link_health.lock();
        AggregatorHealth {
            connected: health.connected,
            last_answer_secs_ago: health.last_answer.map(|at| at.elapsed().as_secs_f64()),
            model_round: health.model_round,
            last_error: health.last_error.clone(),
        }
    }
}
