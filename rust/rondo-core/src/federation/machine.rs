//! The phases of a round and the events that move it: the aggregator attaching, a round being
//! opened, updates accepted or rejected, the round aggregated, and the clock ticking.

use std::collections::{BTreeMap, HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::close::{Verdict, verdict};
use super::selection::{Selection, choose, selection, token_from};
use super::{
    AggregationResult, CloseReason, Command, Delivery, Federation, MAX_METRIC_NAME_BYTES,
    MAX_METRICS_PER_DELIVERY, MAX_REJECTION_REASON_BYTES, MAX_REJECTIONS_PER_PARTICIPANT,
    MAX_REJECTIONS_PER_ROUND, OpenRound, Outcome, ParticipantId, Rejection, RoundRecord, Timestamp,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct ActiveRound {
    pub(super) record: RoundRecord,
    pub(super) tokens: BTreeMap<ParticipantId, String>,
    pub(super) opened_at: Timestamp,
    /// When the aggregator acknowledged the opening: the training deadline counts from here
    /// (an aggregator slow to answer must not eat the participants' time). `None` in a round
    /// saved before this was kept: the opening then stands in.
    #[serde(default)]
    pub(super) training_since: Option<Timestamp>,
    /// Why it is closing, once it is.
    #[serde(default)]
    pub(super) closing_for: Option<CloseReason>,
    // Sets beside the record's lists (which keep the order the status shows), so that the
    // per-tick and per-heartbeat questions cost O(1) per participant, not a scan.
    pub(super) delivered: HashSet<ParticipantId>,
    pub(super) dropped: HashSet<ParticipantId>,
    /// No longer waited for: not delivered when the training deadline (or round_timeout)
    /// passed.
    #[serde(default)]
    pub(super) missed: HashSet<ParticipantId>,
    started: HashSet<ParticipantId>,
    rejections_by: HashMap<ParticipantId, usize>,
}

impl ActiveRound {
    pub(super) fn is_selected(&self, id: &str) -> bool {
        self.tokens.contains_key(id)
    }

    pub(super) fn has_delivered(&self, id: &str) -> bool {
        self.delivered.contains(id)
    }

    pub(super) fn has_started(&self, id: &str) -> bool {
        self.started.contains(id)
    }

    pub(super) fn mark_started(&mut self, id: &str) {
        if self.started.insert(id.to_string()) {
            self.record.started.push(id.to_string());
        }
    }

    /// Whether the round still waits for `id`'s update: selected, and neither delivered,
    /// dropped nor past its deadline.
    pub(super) fn expects(&self, id: &str) -> bool {
        self.is_selected(id)
            && !self.delivered.contains(id)
            && !self.dropped.contains(id)
            && !self.missed.contains(id)
    }

    /// How many updates the round still waits for.
    pub(super) fn expected(&self) -> usize {
        self.tokens.keys().filter(|id| self.expects(id)).count()
    }

    /// Every participant still expected is no longer waited for: its deadline passed.
    pub(super) fn miss_outstanding(&mut self) {
        let late: Vec<ParticipantId> = self
            .record
            .selected
            .iter()
            .filter(|id| self.expects(id))
            .cloned()
            .collect();
        for id in late {
            self.missed.insert(id.clone());
            self.record.missed_deadline.push(id);
        }
    }

    /// The updates the round closes at; a record saved before targets were kept: all.
    pub(super) fn target(&self) -> usize {
        match self.record.target {
            0 => self.tokens.len(),
            target => target,
        }
    }

    /// The updates the round needs to aggregate; a record saved before quorums were kept: 1.
    pub(super) fn quorum(&self) -> usize {
        self.record.quorum.max(1)
    }

    fn open_round(&self) -> OpenRound {
        OpenRound {
            round: self.record.round,
            attempt: self.record.attempt,
            grants: self.tokens.clone(),
        }
    }

    /// Makes the record say what the aggregated model holds: exactly `contributors` delivered,
    /// with their sample counts. Returns what disagreed, in words.
    fn agree_with(
        &mut self,
        updates: usize,
        total_samples: u64,
        contributors: &BTreeMap<ParticipantId, u64>,
    ) -> (Vec<String>, HashSet<ParticipantId>) {
        let mut discrepancies = Vec::new();
        if updates != contributors.len() {
            discrepancies.push(format!(
                "the aggregator reports {updates} updates but {} contributors",
                contributors.len()
            ));
        }
        let summed = contributors
            .values()
            .fold(0u64, |sum, n| sum.saturating_add(*n));
        if summed != total_samples {
            discrepancies.push(format!(
                "the aggregator reports {total_samples} samples but its contributors' add up \
                 to {summed}"
            ));
        }
        let record = &mut self.record;
        let mut deliveries = Vec::with_capacity(contributors.len());
        for mut delivery in std::mem::take(&mut record.deliveries) {
            let id = &delivery.participant_id;
            match contributors.get(id) {
                Some(&n) => {
                    if delivery.n_samples != n {
                        discrepancies.push(format!(
                            "{id} reported {} samples when accepted, {n} when aggregated",
                            delivery.n_samples
                        ));
                        delivery.n_samples = n;
                    }
                    deliveries.push(delivery);
                }
                None => discrepancies.push(format!(
                    "{id} was reported accepted but is not in the aggregated model; not counted \
                     as delivered"
                )),
            }
        }
        let mut heard: HashSet<ParticipantId> = deliveries
            .iter()
            .map(|d| d.participant_id.clone())
            .collect();
        let mut unheard = HashSet::new();
        // Contributors whose notice has not come: the selected ones in selection order, then
        // (never expected) any the coordinator did not select.
        let selected_first = record
            .selected
            .iter()
            .filter(|id| contributors.contains_key(*id))
            .chain(contributors.keys());
        for id in selected_first {
            if !heard.insert(id.clone()) {
                continue;
            }
            if !self.tokens.contains_key(id) {
                discrepancies.push(format!(
                    "{id} is in the aggregated model but was not selected"
                ));
            }
            unheard.insert(id.clone());
            deliveries.push(Delivery {
                participant_id: id.clone(),
                n_samples: contributors[id],
                metrics: BTreeMap::new(),
                metrics_dropped: 0,
            });
        }
        record.delivered = deliveries
            .iter()
            .map(|d| d.participant_id.clone())
            .collect();
        record.deliveries = deliveries;
        record.dropped.retain(|id| !contributors.contains_key(id));
        // Whoever is in the model delivered, deadline or not.
        record
            .missed_deadline
            .retain(|id| !contributors.contains_key(id));
        self.delivered = heard;
        self.dropped.retain(|id| !contributors.contains_key(id));
        self.missed.retain(|id| !contributors.contains_key(id));
        (discrepancies, unheard)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) enum Phase {
    WaitingForAggregator,
    WaitingForParticipants,
    Opening(ActiveRound),
    Training(ActiveRound),
    Closing(ActiveRound),
    Finished,
}

/// What [`Federation::round_aggregated`] made of news of a closed round.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RoundClosed {
    /// Where the aggregator's report disagreed with itself or with the notices heard before
    /// it, in words, for the edge to log. The record follows the aggregator regardless.
    pub discrepancies: Vec<String>,
}

/// Contributors of the round closed last whose "accepted" notice had not arrived yet: if it
/// comes late, its metrics still reach the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct AwaitingNotices {
    round: u32,
    attempt: u32,
    ids: HashSet<ParticipantId>,
}

impl Federation {
    /// The aggregator is reachable. `model_round` is the round of the global model it holds
    /// (`None` when it has none yet, so round 0 must establish one). Later calls (after a
    /// reconnect) change nothing.
    ///
    /// After a reconnect, an aggregator whose model is older than the last round aggregated
    /// here has restarted and lost rounds: the federation rewinds to the round after the model
    /// it has, closing the round in progress as failed with that reason. Returns the round it
    /// rewound to, if it did.
    pub fn aggregator_attached(&mut self, model_round: Option<u32>, now: Timestamp) -> Option<u32> {
        let resume_at = model_round.map_or(0, |r| r + 1);
        match self.phase {
            Phase::WaitingForAggregator => {
                self.round = resume_at;
                self.attempt = 0;
                self.phase = if self.round > self.settings.rounds {
                    Phase::Finished
                } else {
                    Phase::WaitingForParticipants
                };
                None
            }
            // A finished federation's result is whatever the aggregator kept; nothing to redo.
            Phase::Finished => None,
            _ if resume_at >= self.round => None,
            _ => {
                let reason = format!(
                    "round {} attempt {} failed: the aggregator restarted holding the model of \
                     {}; rounds from {resume_at} are run again",
                    self.round,
                    self.attempt,
                    model_round.map_or("no round".to_string(), |r| format!("round {r}")),
                );
                let phase = std::mem::replace(&mut self.phase, Phase::WaitingForParticipants);
                if let Phase::Opening(mut active)
                | Phase::Training(mut active)
                | Phase::Closing(mut active) = phase
                {
                    active.record.outcome = Some(Outcome::Failed);
                    active.record.close_reason = Some(CloseReason::AggregatorRestarted);
                    active.record.reason = Some(reason);
                    active.record.duration_secs = Some(now.since(active.opened_at).as_secs_f64());
                    self.push_history(active.record);
                }
                self.round = resume_at;
                self.attempt += 1;
                // The rounds it names are run again, so the same (round, attempt) may recur.
                self.awaiting_notices = None;
                Some(resume_at)
            }
        }
    }

    /// The aggregator acknowledged `OpenRound` at `now`: training starts, and the training
    /// deadline counts from here.
    pub fn round_opened(&mut self, round: u32, attempt: u32, now: Timestamp) {
        if (round, attempt) != (self.round, self.attempt) {
            return;
        }
        if let Phase::Opening(_) = self.phase {
            let Phase::Opening(mut active) = std::mem::replace(&mut self.phase, Phase::Finished)
            else {
                unreachable!("matched above")
            };
            active.training_since = Some(now);
            self.phase = Phase::Training(active);
        }
    }

    /// The aggregator accepted an update. Idempotent: a repeated report counts once. Metrics
    /// beyond [`MAX_METRICS_PER_DELIVERY`], with names over [`MAX_METRIC_NAME_BYTES`] or with
    /// non-finite values are dropped (and counted in the delivery): the aggregator limits them
    /// too, but what the history keeps must not depend on that.
    ///
    /// A notice for the round closed last that comes after its `round_aggregated` only adds
    /// the metrics of a contributor whose notice was missing; who delivered is settled.
    pub fn update_accepted(
        &mut self,
        round: u32,
        attempt: u32,
        id: &str,
        n_samples: u64,
        metrics: BTreeMap<String, f64>,
    ) {
        if (round, attempt) != (self.round, self.attempt)
            || matches!(self.phase, Phase::WaitingForParticipants | Phase::Finished)
        {
            self.late_metrics(round, attempt, id, metrics);
            return;
        }
        // Opening too: a coordinator restored from its store before it saved the aggregator's
        // acknowledgement hears of updates the aggregator accepted meanwhile; they count.
        let (Phase::Opening(active) | Phase::Training(active) | Phase::Closing(active)) =
            &mut self.phase
        else {
            return;
        };
        if !active.is_selected(id) || active.has_delivered(id) {
            return;
        }
        let (metrics, metrics_dropped) = bounded_metrics(metrics);
        active.delivered.insert(id.to_string());
        if active.dropped.remove(id) {
            active.record.dropped.retain(|d| d != id);
        }
        // Late, but in: the aggregator counts it (its contributors settle it at the close).
        if active.missed.remove(id) {
            active.record.missed_deadline.retain(|d| d != id);
        }
        active.record.delivered.push(id.to_string());
        active.record.deliveries.push(Delivery {
            participant_id: id.to_string(),
            n_samples,
            metrics,
            metrics_dropped,
        });
    }

    fn late_metrics(&mut self, round: u32, attempt: u32, id: &str, metrics: BTreeMap<String, f64>) {
        let Some(awaiting) = self.awaiting_notices.as_mut() else {
            return;
        };
        if (awaiting.round, awaiting.attempt) != (round, attempt) || !awaiting.ids.remove(id) {
            return;
        }
        let delivery = self
            .history
            .iter_mut()
            .rev()
            .find(|r| (r.round, r.attempt) == (round, attempt))
            .and_then(|r| r.deliveries.iter_mut().find(|d| d.participant_id == id));
        if let Some(delivery) = delivery {
            (delivery.metrics, delivery.metrics_dropped) = bounded_metrics(metrics);
        }
    }

    /// The aggregator refused an upload. The participant may try again while the round is open.
    /// At most [`MAX_REJECTIONS_PER_PARTICIPANT`] distinct reasons are kept per participant and
    /// [`MAX_REJECTIONS_PER_ROUND`] in all, each cut to [`MAX_REJECTION_REASON_BYTES`]; the
    /// rest are counted.
    pub fn update_rejected(&mut self, round: u32, attempt: u32, id: &str, reason: String) {
        if (round, attempt) != (self.round, self.attempt) {
            return;
        }
        if let Phase::Training(active) | Phase::Closing(active) = &mut self.phase {
            let reason = truncated(reason, MAX_REJECTION_REASON_BYTES);
            let duplicate = active
                .record
                .rejections
                .iter()
                .any(|r| r.participant_id == id && r.reason == reason);
            if duplicate {
                return;
            }
            let kept = active.rejections_by.entry(id.to_string()).or_insert(0);
            if *kept >= MAX_REJECTIONS_PER_PARTICIPANT
                || active.record.rejections.len() >= MAX_REJECTIONS_PER_ROUND
            {
                active.record.rejections_dropped += 1;
                return;
            }
            *kept += 1;
            active.record.rejections.push(Rejection {
                participant_id: id.to_string(),
                reason,
            });
        }
    }

    /// The aggregator finished closing a round. Idempotent: `None` for a repeat or a stale
    /// report. An aggregated round's record is made to agree with the aggregator's
    /// contributors (see [`RoundClosed::discrepancies`]).
    pub fn round_aggregated(
        &mut self,
        round: u32,
        attempt: u32,
        result: AggregationResult,
        now: Timestamp,
    ) -> Option<RoundClosed> {
        if (round, attempt) != (self.round, self.attempt) {
            return None;
        }
        let Phase::Closing(_) = self.phase else {
            return None;
        };
        let Phase::Closing(mut active) =
            std::mem::replace(&mut self.phase, Phase::WaitingForParticipants)
        else {
            unreachable!("matched above")
        };
        let closed_for = active
            .closing_for
            .take()
            .unwrap_or_else(|| active.settled_reason());
        active.record.duration_secs = Some(now.since(active.opened_at).as_secs_f64());
        let mut closed = RoundClosed::default();
        self.awaiting_notices = None;
        match result {
            AggregationResult::Aggregated {
                updates,
                total_samples,
                contributors,
            } => {
                let (discrepancies, unheard) =
                    active.agree_with(updates, total_samples, &contributors);
                closed.discrepancies = discrepancies;
                if !unheard.is_empty() {
                    self.awaiting_notices = Some(AwaitingNotices {
                        round,
                        attempt,
                        ids: unheard,
                    });
                }
                active.record.outcome = Some(Outcome::Aggregated);
                active.record.close_reason = Some(closed_for);
                active.record.reason = Some(self.describe(&active, closed_for));
                if self.round >= self.settings.rounds {
                    self.phase = Phase::Finished;
                    // Chosen now, before any heartbeat can hear "finish". Who scores the
                    // final model needs no secrecy: a generator seeded from the time will do.
                    self.ask_final(now, &mut StdRng::seed_from_u64(now.as_millis()));
                } else {
                    self.round += 1;
                    self.attempt = 0;
                }
            }
            AggregationResult::Failed { reason } => {
                active.record.outcome = Some(Outcome::Failed);
                active.record.close_reason = Some(CloseReason::AggregationFailed);
                active.record.reason =
                    Some(self.describe_aggregation_failure(&active, closed_for, &reason));
                self.attempt += 1;
            }
        }
        self.push_history(active.record);
        Some(closed)
    }

    /// Advances time: drops silent participants, opens and closes rounds. `rng` picks the
    /// participants and their tokens when a round opens.
    pub fn tick<R: Rng + ?Sized>(&mut self, now: Timestamp, rng: &mut R) -> Vec<Command> {
        let newly_dropped = self.drop_silent(now);
        if let Phase::Opening(active) | Phase::Training(active) | Phase::Closing(active) =
            &mut self.phase
        {
            for id in newly_dropped {
                // One already past its deadline stays listed as that: it is why the round
                // stopped waiting for it.
                if active.expects(&id) {
                    active.dropped.insert(id.clone());
                    active.record.dropped.push(id);
                }
            }
        }
        self.forget_long_dropped(now);
        let mut commands = Vec::new();
        match &mut self.phase {
            Phase::WaitingForAggregator | Phase::Finished => {}
            Phase::WaitingForParticipants => {
                if let Some(command) = self.try_open_round(now, rng) {
                    commands.push(command);
                }
            }
            Phase::Opening(active) => commands.push(Command::OpenRound(active.open_round())),
            Phase::Training(active) => match verdict(active, now, &self.settings) {
                None => {}
                Some(Verdict::Close(reason)) => {
                    active.closing_for = Some(reason);
                    let Phase::Training(active) =
                        std::mem::replace(&mut self.phase, Phase::Finished)
                    else {
                        unreachable!("matched above")
                    };
                    self.phase = Phase::Closing(active);
                    commands.push(self.close_command());
                }
                Some(Verdict::Fail(reason)) => {
                    let Phase::Training(active) =
                        std::mem::replace(&mut self.phase, Phase::WaitingForParticipants)
                    else {
                        unreachable!("matched above")
                    };
                    self.fail_attempt(active, reason, now);
                }
            },
            Phase::Closing(_) => commands.push(self.close_command()),
        }
        commands
    }

    fn close_command(&self) -> Command {
        Command::CloseRound {
            round: self.round,
            attempt: self.attempt,
        }
    }

    /// Fails the attempt `active` ran, here rather than at the aggregator: the round is run
    /// again (same number, next attempt) with whoever is available then.
    ///
    /// No close is sent: the aggregator would make a model of whatever it has, which is what
    /// the quorum forbids. The next attempt's opening replaces the one it holds, dropping that
    /// attempt's partial sum and its tokens.
    fn fail_attempt(&mut self, mut active: ActiveRound, reason: CloseReason, now: Timestamp) {
        active.record.outcome = Some(Outcome::Failed);
        active.record.close_reason = Some(reason);
        active.record.duration_secs = Some(now.since(active.opened_at).as_secs_f64());
        active.record.reason = Some(self.describe(&active, reason));
        self.push_history(active.record);
        self.attempt += 1;
        self.phase = Phase::WaitingForParticipants;
    }

    fn try_open_round<R: Rng + ?Sized>(&mut self, now: Timestamp, rng: &mut R) -> Option<Command> {
        // Fewer have ever joined than a round needs: counting the available (a lookup each,
        // on every tick while the federation waits) cannot find enough.
        if self.join_order.len() < self.settings.min_clients.max(1) {
            return None;
        }
        let Selection { target, selects } =
            selection(&self.settings, self.round, self.available().count())?;
        let selected = choose(self.available(), selects, rng);
        let tokens: BTreeMap<_, _> = selected
            .iter()
            .map(|id| (id.clone(), token_from(rng)))
            .collect();
        let active = ActiveRound {
            record: RoundRecord::opening(
                self.round,
                self.attempt,
                selected,
                target,
                self.settings.min_updates.clamp(1, target),
            ),
            tokens,
            opened_at: now,
            training_since: None,
            closing_for: None,
            delivered: HashSet::new(),
            dropped: HashSet::new(),
            missed: HashSet::new(),
            started: HashSet::new(),
            rejections_by: HashMap::new(),
        };
        if let Some(model_round) = self.round.checked_sub(1) {
            self.ask_selected(model_round, &active.record.selected, rng);
        }
        let command = Command::OpenRound(active.open_round());
        self.phase = Phase::Opening(active);
        Some(command)
    }

    /// The open round's grants, for re-sending after the aggregator restarted.
    pub fn open_round_command(&self) -> Option<Command> {
        match &self.phase {
            Phase::Opening(a) | Phase::Training(a) | Phase::Closing(a) => {
                Some(Command::OpenRound(a.open_round()))
            }
            _ => None,
        }
    }

    pub(super) fn active(&self) -> Option<&ActiveRound> {
        match &self.phase {
            Phase::Opening(a) | Phase::Training(a) | Phase::Closing(a) => Some(a),
            _ => None,
        }
    }
}

/// The metrics a delivery keeps, and how many it dropped.
fn bounded_metrics(metrics: BTreeMap<String, f64>) -> (BTreeMap<String, f64>, usize) {
    let offered = metrics.len();
    let kept: BTreeMap<String, f64> = metrics
        .into_iter()
        .filter(|(name, value)| name.len() <= MAX_METRIC_NAME_BYTES && value.is_finite())
        .take(MAX_METRICS_PER_DELIVERY)
        .collect();
    let dropped = offered - kept.len();
    (kept, dropped)
}

/// `text` cut to at most `max` bytes, on a character boundary, marked when cut.
fn truncated(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    const MARK: &str = "…";
    let mut end = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(MARK);
    text
}
