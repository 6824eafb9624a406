//! The coordinator as one shared object: the federation state machine behind its lock, the
//! aggregator's public URL once known, a wake-up for the driver, and the metrics; and what the
//! state machine takes from the edge: the clock, and randomness from the OS.

use parking_lot::{Mutex, MutexGuard, RwLock};
use std::time::{Instant, SystemTime};

use prometheus::{Gauge, GaugeVec, IntCounter, IntGauge, IntGaugeVec, Opts, Registry};
use rand::TryRngCore;
use rand::rngs::OsRng;
use rondo_core::federation::{
    EvaluationSummary, Federation, FederationError, FederationStatus, MAX_METRICS_PER_DELIVERY,
    ParticipantId, Timestamp, token_from,
};
use tokio::sync::{Notify, watch};

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
struct Clock {
    epoch_millis: u64,
    started: Instant,
}

impl Clock {
    fn new() -> Self {
        let epoch_millis = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            epoch_millis,
            started: Instant::now(),
        }
    }

    fn now(&self) -> Timestamp {
        let elapsed = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        Timestamp::from_millis(self.epoch_millis.saturating_add(elapsed))
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub heartbeats: IntCounter,
    pub joins: IntCounter,
    pub rounds_closed: IntCounter,
    pub round: IntGauge,
    pub participants: IntGaugeVec,
    pub evaluation_reports: IntCounter,
    pub evaluation_round: IntGauge,
    pub evaluation_loss: Gauge,
    pub evaluation_metric: GaugeVec,
}

impl Metrics {
    fn new() -> Self {
        let heartbeats = IntCounter::new("heartbeats_total", "Heartbeats answered").expect("valid");
        let joins = IntCounter::new("joins_total", "Participants joined").expect("valid");
        let rounds_closed =
            IntCounter::new("rounds_closed_total", "Rounds closed (any outcome)").expect("valid");
        let round = IntGauge::new("round", "Round being run").expect("valid");
        let participants = IntGaugeVec::new(
            Opts::new("participants", "Participants by state"),
            &["state"],
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
        let registry = rondo_net::api::registry(
            "rondo_coordinator",
            vec![
                Box::new(heartbeats.clone()),
                Box::new(joins.clone()),
                Box::new(rounds_closed.clone()),
                Box::new(round.clone()),
                Box::new(participants.clone()),
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
            rounds_closed,
            round,
            participants,
            evaluation_reports,
            evaluation_round,
            evaluation_loss,
            evaluation_metric,
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

    pub fn observe(&self, status: &FederationStatus) {
        self.round.set(i64::from(status.round));
        for state in ["available", "selected", "training", "delivered", "dropped"] {
            let count = status.counts.get(state).copied().unwrap_or(0);
            self.participants
                .with_label_values(&[state])
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
        }
    }

    /// Now, as the state machine counts time.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Registers a participant under a fresh random id and secret; returns them.
    pub fn join(&self, name: Option<String>, can_evaluate: bool) -> (ParticipantId, String) {
        let mut federation = self.federation();
        loop {
            let id = uuid::Uuid::new_v4().to_string();
            let secret = random_token();
            match federation.join(
                id.clone(),
                secret.clone(),
                name.clone(),
                can_evaluate,
                self.now(),
            ) {
                Ok(()) => return (id, secret),
                // 122 random bits collided: draw again.
                Err(FederationError::AlreadyJoined(_)) => continue,
                Err(other) => unreachable!("join refuses only a taken id, got {other}"),
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
