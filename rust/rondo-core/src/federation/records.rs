//! What the federation shows of itself: its phase, where each participant stands, and the
//! round records its history keeps. The coordinator builds the status endpoint's view
//! (`docs/openapi/coordinator.json`, `CoordinatorStatus`) from these.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::machine::Phase;
use super::{EvaluationSummary, Federation, ParticipantId, Timestamp};

/// The phase the round state machine is in, without what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseName {
    WaitingForAggregator,
    WaitingForParticipants,
    Opening,
    Training,
    Closing,
    Finished,
}

/// Where a participant stands in the running round (or `Available` between rounds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParticipantState {
    Available,
    Selected,
    Training,
    Delivered,
    Dropped,
}

impl PhaseName {
    pub const ALL: [PhaseName; 6] = [
        Self::WaitingForAggregator,
        Self::WaitingForParticipants,
        Self::Opening,
        Self::Training,
        Self::Closing,
        Self::Finished,
    ];

    /// Its name in the status JSON and the metrics' `phase` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WaitingForAggregator => "waiting_for_aggregator",
            Self::WaitingForParticipants => "waiting_for_participants",
            Self::Opening => "opening",
            Self::Training => "training",
            Self::Closing => "closing",
            Self::Finished => "finished",
        }
    }
}

impl ParticipantState {
    pub const ALL: [ParticipantState; 5] = [
        Self::Available,
        Self::Selected,
        Self::Training,
        Self::Delivered,
        Self::Dropped,
    ];

    /// Its name in the status JSON and the metrics' `state` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Available => "available",
            Self::Selected => "selected",
            Self::Training => "training",
            Self::Delivered => "delivered",
            Self::Dropped => "dropped",
        }
    }
}

/// How a round attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Aggregated,
    Failed,
}

/// Why a round attempt closed, as a code a script can match on; the record's `reason` says it
/// in words. The first five close a round that then aggregates (unless the aggregator fails
/// it: `aggregation_failed`); the others fail the attempt, which is run again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// Every selected participant delivered.
    AllDelivered,
    /// The round's target of updates arrived while over-selected participants still trained.
    TargetReached,
    /// The training deadline passed with at least the quorum of updates.
    TrainingDeadline,
    /// Every selected participant delivered or was dropped (heartbeat timeout), with at least
    /// the quorum of updates.
    ParticipantsDropped,
    /// `round_timeout` passed with at least the quorum of updates.
    RoundTimeout,
    /// Too few participants were still expected to reach the quorum (`min_updates`).
    QuorumUnreachable,
    /// `round_timeout` passed before the quorum of updates arrived.
    QuorumTimeout,
    /// The aggregator could not make a model of the round's updates.
    AggregationFailed,
    /// The aggregator restarted without the round's model; the rounds it lost are run again.
    AggregatorRestarted,
}

impl CloseReason {
    /// The code, as JSON and the CSV write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AllDelivered => "all_delivered",
            Self::TargetReached => "target_reached",
            Self::TrainingDeadline => "training_deadline",
            Self::ParticipantsDropped => "participants_dropped",
            Self::RoundTimeout => "round_timeout",
            Self::QuorumUnreachable => "quorum_unreachable",
            Self::QuorumTimeout => "quorum_timeout",
            Self::AggregationFailed => "aggregation_failed",
            Self::AggregatorRestarted => "aggregator_restarted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub participant_id: ParticipantId,
    pub n_samples: u64,
    pub metrics: BTreeMap<String, f64>,
    /// Metrics the upload carried that were not kept (too many, name too long, not finite).
    pub metrics_dropped: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub participant_id: ParticipantId,
    pub reason: String,
}

/// One attempt at one round, as the status shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u32,
    pub attempt: u32,
    pub selected: Vec<ParticipantId>,
    pub started: Vec<ParticipantId>,
    /// Once aggregated: exactly the participants whose updates are in the model.
    pub delivered: Vec<ParticipantId>,
    pub deliveries: Vec<Delivery>,
    pub dropped: Vec<ParticipantId>,
    pub rejections: Vec<Rejection>,
    /// Rejections not kept (beyond the per-participant cap).
    pub rejections_dropped: usize,
    /// Selected participants that had not delivered when the training deadline (or
    /// `round_timeout`) passed and are not in the model, in selection order.
    #[serde(default)]
    pub missed_deadline: Vec<ParticipantId>,
    /// How many updates the round closes at once they arrived (fewer than `selected` when it
    /// over-selects); 0 in records saved before targets were kept.
    #[serde(default)]
    pub target: usize,
    /// How many updates the round needs to aggregate (`min_updates`, capped by `target`); 0 in
    /// records saved before quorums were kept.
    #[serde(default)]
    pub quorum: usize,
    /// `None` while the round runs; `aggregated` or `failed` once closed.
    pub outcome: Option<Outcome>,
    /// Why the round closed (or failed), as a code; `None` while it runs.
    #[serde(default)]
    pub close_reason: Option<CloseReason>,
    /// Why the round closed (or failed), in words: "round 7: 9 of 10 updates; p3 missed the
    /// training deadline (30 s)", participants by name where they have one.
    pub reason: Option<String>,
    pub duration_secs: Option<f64>,
    /// How participants scored the model this attempt made (aggregated rounds that were
    /// evaluated), weighted by their sample counts.
    pub evaluation: Option<EvaluationSummary>,
}

/// One participant as the federation sees it now (the coordinator's status view is built of
/// these).
impl RoundRecord {
    /// The record of an attempt just opened with `selected`: nothing has happened in it yet.
    pub(super) fn opening(
        round: u32,
        attempt: u32,
        selected: Vec<ParticipantId>,
        target: usize,
        quorum: usize,
    ) -> Self {
        Self {
            round,
            attempt,
            selected,
            started: Vec::new(),
            delivered: Vec::new(),
            deliveries: Vec::new(),
            dropped: Vec::new(),
            rejections: Vec::new(),
            rejections_dropped: 0,
            missed_deadline: Vec::new(),
            target,
            quorum,
            outcome: None,
            close_reason: None,
            reason: None,
            duration_secs: None,
            evaluation: None,
        }
    }

    /// How many participant entries it holds (a name in a list, a delivery, each of its
    /// metrics, a rejection): what its size grows with.
    pub fn entries(&self) -> usize {
        self.selected.len()
            + self.started.len()
            + self.delivered.len()
            + self.dropped.len()
            + self.missed_deadline.len()
            + self.rejections.len()
            + self
                .deliveries
                .iter()
                .map(|d| 1 + d.metrics.len())
                .sum::<usize>()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParticipantView<'a> {
    pub participant_id: &'a ParticipantId,
    pub name: Option<&'a str>,
    pub state: ParticipantState,
    pub can_evaluate: bool,
    pub last_seen: Timestamp,
}

impl Federation {
    /// Every participant still known, in the order they joined.
    pub fn participants(&self) -> impl Iterator<Item = ParticipantView<'_>> {
        let active = self.active();
        self.join_order.iter().filter_map(move |id| {
            let p = self.participants.get(id)?;
            let state = if p.dropped {
                ParticipantState::Dropped
            } else {
                match active {
                    Some(a) if a.has_delivered(id) => ParticipantState::Delivered,
                    Some(a) if a.has_started(id) => ParticipantState::Training,
                    Some(a) if a.is_selected(id) => ParticipantState::Selected,
                    _ => ParticipantState::Available,
                }
            };
            Some(ParticipantView {
                participant_id: id,
                name: p.name.as_deref(),
                state,
                can_evaluate: p.can_evaluate,
                last_seen: p.last_seen,
            })
        })
    }

    /// The last [`super::HISTORY_ROUNDS`] closed round records (fewer where they would hold
    /// more than [`super::HISTORY_ENTRIES`]), oldest first, then the running one.
    pub fn history(&self) -> impl Iterator<Item = &RoundRecord> {
        self.history.iter().chain(self.active().map(|a| &a.record))
    }

    /// How many closed records are older than those [`Self::history`] still keeps.
    pub fn history_forgotten(&self) -> u64 {
        self.history_forgotten
    }

    pub fn phase_name(&self) -> PhaseName {
        match self.phase {
            Phase::WaitingForAggregator => PhaseName::WaitingForAggregator,
            Phase::WaitingForParticipants => PhaseName::WaitingForParticipants,
            Phase::Opening(_) => PhaseName::Opening,
            Phase::Training(_) => PhaseName::Training,
            Phase::Closing(_) => PhaseName::Closing,
            Phase::Finished => PhaseName::Finished,
        }
    }
}
