//! The coordinator's round state machine: who participates, who is selected, when a round
//! opens and closes, and the history that the status endpoint shows.
//!
//! It is driven by events (a join, a heartbeat, "update accepted", "round aggregated", the clock
//! ticking) and answers with [`Command`]s for the edge to carry out over RPC. Time, ids, secrets
//! and randomness are passed in, never made here, so every transition is testable without
//! sleeping, sockets or luck.
//!
//! By concern:
//!
//! - `registry`: participants joining, authenticating and heartbeating.
//! - `selection`: how many and which participants a round takes (its target, and more with
//!   over-selection), and their tokens.
//! - `machine`: the phases of a round — open, train, close — and the history they leave.
//! - `close`: when a training round closes or fails (target, quorum, training deadline,
//!   `round_timeout`), and the words and code its record gives for it.
//! - `evaluation`: who scores which global model, and the weighted means.
//! - `records`: what it shows of itself — the phase, each participant's state, and the round
//!   records of the history; the coordinator's status view is made of these.
//!
//! Life of a round `r`, attempt `a`:
//!
//! ```text
//! WaitingForParticipants ──enough available──▶ Opening ──aggregator acked──▶ Training ───┐
//!     ▲   ▲                 (Command::OpenRound)                              │         │
//!     │   │                          target reached, or no one expected any   │ quorum  │
//!     │   │                          more (delivered, dropped, past deadline) │  met    │ quorum
//!     │   │                                                                   ▼         │ out of
//!     │   └── next round (or same round, next attempt, if it failed) ◀── Closing        │ reach
//!     │                                  (Command::CloseRound … round_aggregated)       │
//!     └──────────────────── same round, next attempt (no close is sent) ◀───────────────┘
//! ```
//!
//! When a round is aggregated, its record is made to agree with the model that was built: the
//! aggregator's list of contributors, not the notices that happened to arrive, says who
//! delivered. `proptests` drives random lives of the machine against a simulated aggregator
//! and checks that this, and the rest of what the history promises, always holds.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod close;
mod evaluation;
mod machine;
#[cfg(test)]
mod proptests;
mod records;
mod registry;
mod selection;
#[cfg(test)]
mod tests;

pub use evaluation::{
    EvaluationError, EvaluationReport, EvaluationSummary, RoundSummary, SUMMARY_MISSED_LISTED,
};
pub use machine::RoundClosed;
pub use records::{
    CloseReason, Delivery, Outcome, ParticipantState, ParticipantView, PhaseName, Rejection,
    RoundRecord,
};
pub use selection::token_from;

use evaluation::Evaluation;
use machine::{AwaitingNotices, Phase};
use registry::Participant;

pub type ParticipantId = String;

/// How many closed round records the history keeps; older ones are forgotten (and counted in
/// [`Federation::history_forgotten`]), so that the status stays bounded however long the
/// federation runs.
pub const HISTORY_ROUNDS: usize = 100;
/// How many participant entries ([`RoundRecord::entries`]) the closed records may hold
/// together: a large federation's history keeps fewer rounds (at least the last one), so that
/// the status and each save of the federation stay a few MB however many take part. 10,000
/// participants delivering for 100 rounds made a 117 MB history without it.
pub const HISTORY_ENTRIES: usize = 100_000;
/// At most this many metrics are kept per delivery; the rest are dropped and counted.
pub const MAX_METRICS_PER_DELIVERY: usize = 32;
/// A metric whose name is longer than this (in bytes) is dropped and counted.
pub const MAX_METRIC_NAME_BYTES: usize = 64;
/// At most this many distinct rejections are kept per participant and round (there are about
/// a dozen kinds of refusal; a participant retrying one kind repeats a reason, kept once)...
pub const MAX_REJECTIONS_PER_PARTICIPANT: usize = 16;
/// ... and at most this many per round, from all participants together.
pub const MAX_REJECTIONS_PER_ROUND: usize = 128;
/// A rejection's reason is cut to this many bytes.
pub const MAX_REJECTION_REASON_BYTES: usize = 256;

/// A moment, in milliseconds since an epoch the edge chooses (the coordinator: the Unix epoch,
/// advanced by a monotonic clock). Plain data rather than an `Instant`, so that the state it
/// appears in (last heartbeats, when rounds opened) can be saved and read back.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn from_millis(millis: u64) -> Self {
        Self(millis)
    }

    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// How long after `earlier` this is; zero if it is not after it (a clock never runs
    /// backwards here, whatever the edge passes in).
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl std::ops::Add<Duration> for Timestamp {
    type Output = Timestamp;

    fn add(self, d: Duration) -> Timestamp {
        let millis = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(millis))
    }
}

/// Knobs of a federation, read from the coordinator's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FederationSettings {
    /// Training rounds to run (round 0, which only establishes the initial model, not counted).
    pub rounds: u32,
    /// A round starts only when this many participants are available, and selects at least
    /// this many.
    pub min_clients: usize,
    /// Fraction of the available participants selected for a round (rounded up).
    pub participants_ratio: f64,
    /// A participant silent for longer than this is dropped.
    pub heartbeat_timeout: Duration,
    /// A round closes with what it has after this long (and participants asked to evaluate
    /// the final model are asked for this long after the last round).
    pub round_timeout: Duration,
    /// Each selected participant's update must arrive within this long of training opening
    /// (the aggregator acknowledging the round); one that has not is no longer waited for.
    /// `None`: `round_timeout`, which then comes first (it counts from the opening).
    #[serde(default)]
    pub training_timeout: Option<Duration>,
    /// The quorum: a round aggregates only with at least this many updates (capped by its
    /// target); one that can no longer reach it fails and is run again.
    #[serde(default = "one")]
    pub min_updates: usize,
    /// Over-selection: a round selects `ceil(target × this)` participants (as many as are
    /// available) and closes once `target` updates arrived. At least 1.
    #[serde(default = "one_f64")]
    pub selection_overcommit: f64,
    /// Evaluate the model of every round divisible by this, and the final one (0: never).
    pub evaluate_every: u32,
    /// Share of the participants able to evaluate that are asked to (rounded up).
    pub evaluate_fraction: f64,
    /// Who may join.
    pub join: JoinPolicy,
}

// Defaults of settings added after federations were first saved, so older saves read back.
fn one() -> usize {
    1
}

fn one_f64() -> f64 {
    1.0
}

impl FederationSettings {
    /// The training deadline: `training_timeout`, or `round_timeout` when not set.
    pub fn training_timeout(&self) -> Duration {
        self.training_timeout.unwrap_or(self.round_timeout)
    }
}

/// Who may join a federation: the holders of its join secret (when it has one), under a name
/// from its list (when it has one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinPolicy {
    /// SHA-256 of the join secret; `None`: anyone may join. The secret itself is not kept.
    pub secret_hash: Option<SecretHash>,
    /// Names allowed to join; empty: any name (or none).
    pub allowed_names: BTreeSet<String>,
    /// Participants in the federation at once, dropped ones not counted; `None`: no cap.
    #[serde(default)]
    pub max_participants: Option<usize>,
}

/// SHA-256 of a secret: what is kept of secrets that are only ever checked, never shown.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SecretHash([u8; 32]);

impl SecretHash {
    pub fn of(secret: &str) -> Self {
        use sha2::Digest;
        Self(sha2::Sha256::digest(secret.as_bytes()).into())
    }

    /// Whether `secret` hashes to this, comparing without an early exit.
    pub fn matches(&self, secret: &str) -> bool {
        constant_time_eq(&Self::of(secret).0, &self.0)
    }
}

impl std::fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretHash(..)")
    }
}

/// What a participant says when it joins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Joining {
    pub name: Option<String>,
    /// It can score a model on its data (federated evaluation).
    pub can_evaluate: bool,
    /// The federation's join secret, as the participant presents it.
    pub join_secret: Option<String>,
}

/// What a heartbeat tells a participant to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    Standby,
    Train {
        round: u32,
        attempt: u32,
    },
    /// Score the final global model (of `round`) and report it.
    Evaluate {
        round: u32,
    },
    Finish,
    Rejected {
        reason: String,
    },
}

/// What a selected participant needs to take part in a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainingGrant {
    pub round: u32,
    pub attempt: u32,
    pub token: String,
    /// `false` in round 0: the participant uploads its initial weights and downloads nothing.
    pub has_global_model: bool,
    /// The round of the downloaded model, when the participant is asked to evaluate it (and
    /// report) before training.
    pub evaluate_round: Option<u32>,
}

/// "Round `round` (attempt `attempt`) is open for these participants": the one message that
/// opens a round, from the state machine's command through the RPC to the aggregator's book.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenRound {
    pub round: u32,
    pub attempt: u32,
    /// participant id → the one-round token it must present.
    pub grants: BTreeMap<ParticipantId, String>,
}

/// Without the tokens: commands are logged (`?command` when the aggregator is slow or
/// refuses), and a token in a log line is an upload slot for whoever reads it.
impl std::fmt::Debug for OpenRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenRound")
            .field("round", &self.round)
            .field("attempt", &self.attempt)
            .field("participants", &self.grants.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Work for the edge: RPCs to send to the aggregator. Each is idempotent, so the edge resends
/// until acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    OpenRound(OpenRound),
    CloseRound { round: u32, attempt: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FederationError {
    #[error("no participant with id `{0}`")]
    UnknownParticipant(ParticipantId),
    #[error("the secret does not match participant `{0}`")]
    InvalidSecret(ParticipantId),
    #[error("participant `{0}` is not selected for a round that is open now")]
    NotSelected(ParticipantId),
    #[error("a participant with id `{0}` has already joined")]
    AlreadyJoined(ParticipantId),
    #[error("joining needs the federation's join secret")]
    MissingJoinSecret,
    #[error("the join secret is wrong")]
    InvalidJoinSecret,
    #[error("the name {0:?} is not among the federation's allowed participants")]
    NotAllowed(Option<String>),
    #[error("the federation has {0} participants, its limit (limits.max_participants)")]
    Full(usize),
    #[error(
        "the credential of participant `{0}` has expired: it was dropped after no heartbeat \
         within heartbeat_timeout_secs; join again"
    )]
    CredentialExpired(ParticipantId),
}

/// How the aggregator finished a round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum AggregationResult {
    Aggregated {
        updates: usize,
        total_samples: u64,
        /// Every participant whose update is in the new model → its `n_samples`.
        contributors: BTreeMap<ParticipantId, u64>,
    },
    Failed {
        reason: String,
    },
}

/// The whole federation as the coordinator sees it: plain data (times as [`Timestamp`]s, no
/// handles), so that a store can save it whole (`serde`) and a restarted coordinator carry on
/// from it (tested by `a_federation_saved_mid_round_carries_on_where_it_was`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Federation {
    settings: FederationSettings,
    participants: HashMap<ParticipantId, Participant>,
    /// Join order, so that status lists participants stably.
    join_order: Vec<ParticipantId>,
    phase: Phase,
    round: u32,
    attempt: u32,
    /// The last [`HISTORY_ROUNDS`] closed records (fewer where they would hold more than
    /// [`HISTORY_ENTRIES`]), oldest first.
    history: VecDeque<RoundRecord>,
    /// Closed records dropped off the front of `history`.
    history_forgotten: u64,
    awaiting_notices: Option<AwaitingNotices>,
    /// Models being evaluated, by round.
    evaluations: BTreeMap<u32, Evaluation>,
    /// Whether the final model's evaluators were chosen.
    final_planned: bool,
    /// One line per closed attempt, every one.
    summaries: Vec<RoundSummary>,
}

impl Federation {
    pub fn new(settings: FederationSettings) -> Self {
        Self {
            settings,
            participants: HashMap::new(),
            join_order: Vec::new(),
            phase: Phase::WaitingForAggregator,
            round: 0,
            attempt: 0,
            history: VecDeque::new(),
            history_forgotten: 0,
            awaiting_notices: None,
            evaluations: BTreeMap::new(),
            final_planned: false,
            summaries: Vec::new(),
        }
    }

    pub fn settings(&self) -> &FederationSettings {
        &self.settings
    }

    /// The round being run now and its attempt.
    pub fn current_round(&self) -> (u32, u32) {
        (self.round, self.attempt)
    }

    /// Carries on with a federation read back from a store after the coordinator restarted:
    /// it runs with the `settings` configured now, and every participant counts as heard from
    /// at `now` (the coordinator was silent, not they: they get a heartbeat timeout to show up
    /// before they are dropped). Returns whether the settings differ from the saved ones.
    pub fn resume(&mut self, settings: FederationSettings, now: Timestamp) -> bool {
        for participant in self.participants.values_mut() {
            participant.last_seen = participant.last_seen.max(now);
        }
        let changed = self.settings != settings;
        self.settings = settings;
        changed
    }

    fn push_history(&mut self, record: RoundRecord) {
        self.summaries.push(RoundSummary::of(&record));
        self.history.push_back(record);
        let mut entries: usize = self.history.iter().map(RoundRecord::entries).sum();
        while self.history.len() > HISTORY_ROUNDS
            || (entries > HISTORY_ENTRIES && self.history.len() > 1)
        {
            let Some(forgotten) = self.history.pop_front() else {
                break;
            };
            entries -= forgotten.entries();
            self.history_forgotten += 1;
        }
    }
}

/// Compares secrets without an early exit, so timing does not reveal how much matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
