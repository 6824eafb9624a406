//! The coordinator's round state machine: who participates, who is selected, when a round
//! opens and closes, and the history that the status endpoint shows.
//!
//! It is driven by events (a join, a heartbeat, "update accepted", "round aggregated", the clock
//! ticking) and answers with [`Command`]s for the edge to carry out over RPC. Time is passed in,
//! never read, so every transition is testable without sleeping or sockets.
//!
//! Life of a round `r`, attempt `a`:
//!
//! ```text
//! WaitingForParticipants ──enough available──▶ Opening ──aggregator acked──▶ Training
//!        ▲                   (Command::OpenRound)                              │
//!        │                                      all selected delivered or dropped, or deadline
//!        │                                                                     ▼
//!        └──── next round (or same round, next attempt, if it failed) ◀── Closing
//!                                        (Command::CloseRound … round_aggregated)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rand::Rng;
use rand::seq::IteratorRandom;
use serde::{Deserialize, Serialize};

pub type ParticipantId = String;

/// Knobs of a federation, read from the coordinator's config.
#[derive(Debug, Clone)]
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
    /// A round closes with what it has after this long.
    pub round_timeout: Duration,
}

/// What a heartbeat tells a participant to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    Standby,
    Train { round: u32, attempt: u32 },
    Finish,
    Rejected { reason: String },
}

/// What a selected participant needs to take part in a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainingGrant {
    pub round: u32,
    pub attempt: u32,
    pub token: String,
    /// `false` in round 0: the participant uploads its initial weights and downloads nothing.
    pub has_global_model: bool,
}

/// Work for the edge: RPCs to send to the aggregator. Each is idempotent, so the edge resends
/// until acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    OpenRound {
        round: u32,
        attempt: u32,
        /// participant id → one-round token.
        grants: BTreeMap<ParticipantId, String>,
    },
    CloseRound {
        round: u32,
        attempt: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FederationError {
    #[error("no participant with id `{0}`")]
    UnknownParticipant(ParticipantId),
    #[error("the secret does not match participant `{0}`")]
    InvalidSecret(ParticipantId),
    #[error("participant `{0}` is not selected for a round that is open now")]
    NotSelected(ParticipantId),
}

/// How the aggregator finished a round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum AggregationResult {
    Aggregated { updates: usize, total_samples: u64 },
    Failed { reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseName {
    WaitingForAggregator,
    WaitingForParticipants,
    Opening,
    Training,
    Closing,
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParticipantState {
    Available,
    Selected,
    Training,
    Delivered,
    Dropped,
}

#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    pub participant_id: ParticipantId,
    pub n_samples: u64,
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rejection {
    pub participant_id: ParticipantId,
    pub reason: String,
}

/// One attempt at one round, as the status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RoundRecord {
    pub round: u32,
    pub attempt: u32,
    pub selected: Vec<ParticipantId>,
    pub started: Vec<ParticipantId>,
    pub delivered: Vec<ParticipantId>,
    pub deliveries: Vec<Delivery>,
    pub dropped: Vec<ParticipantId>,
    pub rejections: Vec<Rejection>,
    /// `None` while the round runs; `aggregated` or `failed` once closed.
    pub outcome: Option<&'static str>,
    /// Why the round closed (or failed), in words.
    pub reason: Option<String>,
    pub duration_secs: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ParticipantStatus {
    pub participant_id: ParticipantId,
    pub name: Option<String>,
    pub state: ParticipantState,
    pub last_heartbeat_secs_ago: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FederationStatus {
    pub phase: PhaseName,
    pub round: u32,
    pub attempt: u32,
    pub rounds: u32,
    pub participants: Vec<ParticipantStatus>,
    pub counts: BTreeMap<&'static str, usize>,
    pub history: Vec<RoundRecord>,
}

#[derive(Debug)]
struct Participant {
    name: Option<String>,
    secret: String,
    last_seen: Instant,
    dropped: bool,
}

#[derive(Debug)]
struct ActiveRound {
    record: RoundRecord,
    tokens: BTreeMap<ParticipantId, String>,
    opened_at: Instant,
    close_reason: Option<String>,
}

impl ActiveRound {
    fn is_selected(&self, id: &str) -> bool {
        self.tokens.contains_key(id)
    }

    fn has_delivered(&self, id: &str) -> bool {
        self.record.delivered.iter().any(|d| d == id)
    }

    fn has_dropped(&self, id: &str) -> bool {
        self.record.dropped.iter().any(|d| d == id)
    }

    fn outstanding(&self) -> usize {
        self.tokens
            .keys()
            .filter(|id| !self.has_delivered(id) && !self.has_dropped(id))
            .count()
    }
}

#[derive(Debug)]
enum Phase {
    WaitingForAggregator,
    WaitingForParticipants,
    Opening(ActiveRound),
    Training(ActiveRound),
    Closing(ActiveRound),
    Finished,
}

/// The whole federation as the coordinator sees it.
#[derive(Debug)]
pub struct Federation {
    settings: FederationSettings,
    participants: HashMap<ParticipantId, Participant>,
    /// Join order, so that status lists participants stably.
    join_order: Vec<ParticipantId>,
    phase: Phase,
    round: u32,
    attempt: u32,
    history: Vec<RoundRecord>,
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
            history: Vec::new(),
        }
    }

    pub fn settings(&self) -> &FederationSettings {
        &self.settings
    }

    /// The aggregator is reachable. `model_round` is the round of the global model it holds
    /// (`None` when it has none yet, so round 0 must establish one). Later calls (after a
    /// reconnect) change nothing.
    ///
    /// After a reconnect, an aggregator whose model is older than the last round aggregated
    /// here has restarted and lost rounds: the federation rewinds to the round after the model
    /// it has, closing the round in progress as failed with that reason. Returns the round it
    /// rewound to, if it did.
    pub fn aggregator_attached(&mut self, model_round: Option<u32>, now: Instant) -> Option<u32> {
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
                    "the aggregator restarted holding the model of {}; rounds from {resume_at} \
                     are run again",
                    model_round.map_or("no round".to_string(), |r| format!("round {r}")),
                );
                let phase = std::mem::replace(&mut self.phase, Phase::WaitingForParticipants);
                if let Phase::Opening(mut active)
                | Phase::Training(mut active)
                | Phase::Closing(mut active) = phase
                {
                    active.record.outcome = Some("failed");
                    active.record.reason = Some(reason);
                    active.record.duration_secs =
                        Some(now.duration_since(active.opened_at).as_secs_f64());
                    self.history.push(active.record);
                }
                self.round = resume_at;
                self.attempt += 1;
                Some(resume_at)
            }
        }
    }

    pub fn join(&mut self, name: Option<String>, now: Instant) -> (ParticipantId, String) {
        let id = uuid::Uuid::new_v4().to_string();
        let secret = random_token();
        self.participants.insert(
            id.clone(),
            Participant {
                name,
                secret: secret.clone(),
                last_seen: now,
                dropped: false,
            },
        );
        self.join_order.push(id.clone());
        (id, secret)
    }

    fn authenticate(
        &mut self,
        id: &str,
        secret: &str,
    ) -> Result<&mut Participant, FederationError> {
        let participant = self
            .participants
            .get_mut(id)
            .ok_or_else(|| FederationError::UnknownParticipant(id.to_string()))?;
        if !constant_time_eq(participant.secret.as_bytes(), secret.as_bytes()) {
            return Err(FederationError::InvalidSecret(id.to_string()));
        }
        Ok(participant)
    }

    pub fn heartbeat(
        &mut self,
        id: &str,
        secret: &str,
        now: Instant,
    ) -> Result<Action, FederationError> {
        let participant = self.authenticate(id, secret)?;
        if participant.dropped {
            return Ok(Action::Rejected {
                reason: "dropped: no heartbeat within heartbeat_timeout; join again".into(),
            });
        }
        participant.last_seen = now;
        Ok(match &self.phase {
            Phase::Finished => Action::Finish,
            Phase::Training(active) if active.is_selected(id) && !active.has_delivered(id) => {
                Action::Train {
                    round: self.round,
                    attempt: self.attempt,
                }
            }
            _ => Action::Standby,
        })
    }

    pub fn start_training(
        &mut self,
        id: &str,
        secret: &str,
        now: Instant,
    ) -> Result<TrainingGrant, FederationError> {
        let participant = self.authenticate(id, secret)?;
        if participant.dropped {
            return Err(FederationError::NotSelected(id.to_string()));
        }
        participant.last_seen = now;
        let round = self.round;
        let attempt = self.attempt;
        let Phase::Training(active) = &mut self.phase else {
            return Err(FederationError::NotSelected(id.to_string()));
        };
        let Some(token) = active.tokens.get(id).cloned() else {
            return Err(FederationError::NotSelected(id.to_string()));
        };
        if active.has_delivered(id) {
            return Err(FederationError::NotSelected(id.to_string()));
        }
        if !active.record.started.iter().any(|s| s == id) {
            active.record.started.push(id.to_string());
        }
        Ok(TrainingGrant {
            round,
            attempt,
            token,
            has_global_model: round > 0,
        })
    }

    /// The aggregator acknowledged `OpenRound`.
    pub fn round_opened(&mut self, round: u32, attempt: u32) {
        if (round, attempt) != (self.round, self.attempt) {
            return;
        }
        if let Phase::Opening(_) = self.phase {
            let Phase::Opening(active) = std::mem::replace(&mut self.phase, Phase::Finished) else {
                unreachable!("matched above")
            };
            self.phase = Phase::Training(active);
        }
    }

    /// The aggregator accepted an update. Idempotent: a repeated report counts once.
    pub fn update_accepted(
        &mut self,
        round: u32,
        attempt: u32,
        id: &str,
        n_samples: u64,
        metrics: BTreeMap<String, f64>,
    ) {
        if (round, attempt) != (self.round, self.attempt) {
            return;
        }
        let (Phase::Training(active) | Phase::Closing(active)) = &mut self.phase else {
            return;
        };
        if !active.is_selected(id) || active.has_delivered(id) {
            return;
        }
        active.record.delivered.push(id.to_string());
        active.record.deliveries.push(Delivery {
            participant_id: id.to_string(),
            n_samples,
            metrics,
        });
    }

    /// The aggregator refused an upload. The participant may try again while the round is open.
    pub fn update_rejected(&mut self, round: u32, attempt: u32, id: &str, reason: String) {
        if (round, attempt) != (self.round, self.attempt) {
            return;
        }
        if let Phase::Training(active) | Phase::Closing(active) = &mut self.phase {
            let duplicate = active
                .record
                .rejections
                .iter()
                .any(|r| r.participant_id == id && r.reason == reason);
            if !duplicate {
                active.record.rejections.push(Rejection {
                    participant_id: id.to_string(),
                    reason,
                });
            }
        }
    }

    /// The aggregator finished closing a round. Idempotent: returns whether this report was
    /// news (`false` for a repeat or a stale one).
    pub fn round_aggregated(
        &mut self,
        round: u32,
        attempt: u32,
        result: AggregationResult,
        now: Instant,
    ) -> bool {
        if (round, attempt) != (self.round, self.attempt) {
            return false;
        }
        let Phase::Closing(_) = self.phase else {
            return false;
        };
        let Phase::Closing(mut active) =
            std::mem::replace(&mut self.phase, Phase::WaitingForParticipants)
        else {
            unreachable!("matched above")
        };
        let close_reason = active.close_reason.take().unwrap_or_default();
        active.record.duration_secs = Some(now.duration_since(active.opened_at).as_secs_f64());
        match result {
            AggregationResult::Aggregated { .. } => {
                active.record.outcome = Some("aggregated");
                active.record.reason = Some(close_reason);
                if self.round >= self.settings.rounds {
                    self.phase = Phase::Finished;
                } else {
                    self.round += 1;
                    self.attempt = 0;
                }
            }
            AggregationResult::Failed { reason } => {
                active.record.outcome = Some("failed");
                active.record.reason = Some(format!("{close_reason}; {reason}; round is rerun"));
                self.attempt += 1;
            }
        }
        self.history.push(active.record);
        true
    }

    /// Advances time: drops silent participants, opens and closes rounds.
    pub fn tick(&mut self, now: Instant) -> Vec<Command> {
        self.drop_silent(now);
        let mut commands = Vec::new();
        match &mut self.phase {
            Phase::WaitingForAggregator | Phase::Finished => {}
            Phase::WaitingForParticipants => {
                if let Some(command) = self.try_open_round(now) {
                    commands.push(command);
                }
            }
            Phase::Opening(active) => commands.push(Command::OpenRound {
                round: self.round,
                attempt: self.attempt,
                grants: active.tokens.clone(),
            }),
            Phase::Training(active) => {
                if let Some(reason) = close_reason(active, now, self.settings.round_timeout) {
                    active.close_reason = Some(reason);
                    let Phase::Training(active) =
                        std::mem::replace(&mut self.phase, Phase::Finished)
                    else {
                        unreachable!("matched above")
                    };
                    self.phase = Phase::Closing(active);
                    commands.push(self.close_command());
                }
            }
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

    fn drop_silent(&mut self, now: Instant) {
        let timeout = self.settings.heartbeat_timeout;
        let mut newly_dropped = Vec::new();
        for (id, participant) in &mut self.participants {
            if !participant.dropped && now.duration_since(participant.last_seen) > timeout {
                participant.dropped = true;
                newly_dropped.push(id.clone());
            }
        }
        if let Phase::Opening(active) | Phase::Training(active) | Phase::Closing(active) =
            &mut self.phase
        {
            for id in newly_dropped {
                if active.is_selected(&id) && !active.has_delivered(&id) {
                    active.record.dropped.push(id);
                }
            }
        }
    }

    fn available(&self) -> impl Iterator<Item = &ParticipantId> {
        self.join_order
            .iter()
            .filter(|id| self.participants.get(*id).is_some_and(|p| !p.dropped))
    }

    fn try_open_round(&mut self, now: Instant) -> Option<Command> {
        let available = self.available().count();
        let needed = self.settings.min_clients.max(1);
        if available < needed {
            return None;
        }
        let count = if self.round == 0 {
            1
        } else {
            let by_ratio = (self.settings.participants_ratio * available as f64).ceil() as usize;
            by_ratio.max(needed).min(available)
        };
        let mut rng = rand::rng();
        let mut selected: Vec<ParticipantId> =
            self.available().cloned().choose_multiple(&mut rng, count);
        selected.sort_by_key(|id| self.join_order.iter().position(|j| j == id));
        let tokens: BTreeMap<_, _> = selected
            .iter()
            .map(|id| (id.clone(), random_token()))
            .collect();
        let active = ActiveRound {
            record: RoundRecord {
                round: self.round,
                attempt: self.attempt,
                selected,
                started: Vec::new(),
                delivered: Vec::new(),
                deliveries: Vec::new(),
                dropped: Vec::new(),
                rejections: Vec::new(),
                outcome: None,
                reason: None,
                duration_secs: None,
            },
            tokens,
            opened_at: now,
            close_reason: None,
        };
        let command = Command::OpenRound {
            round: self.round,
            attempt: self.attempt,
            grants: active.tokens.clone(),
        };
        self.phase = Phase::Opening(active);
        Some(command)
    }

    pub fn status(&self, now: Instant) -> FederationStatus {
        let active = match &self.phase {
            Phase::Opening(a) | Phase::Training(a) | Phase::Closing(a) => Some(a),
            _ => None,
        };
        let participants: Vec<ParticipantStatus> = self
            .join_order
            .iter()
            .filter_map(|id| {
                let p = self.participants.get(id)?;
                let state = if p.dropped {
                    ParticipantState::Dropped
                } else {
                    match active {
                        Some(a) if a.has_delivered(id) => ParticipantState::Delivered,
                        Some(a) if a.record.started.iter().any(|s| s == id) => {
                            ParticipantState::Training
                        }
                        Some(a) if a.is_selected(id) => ParticipantState::Selected,
                        _ => ParticipantState::Available,
                    }
                };
                Some(ParticipantStatus {
                    participant_id: id.clone(),
                    name: p.name.clone(),
                    state,
                    last_heartbeat_secs_ago: now.duration_since(p.last_seen).as_secs_f64(),
                })
            })
            .collect();
        let mut counts = BTreeMap::new();
        for p in &participants {
            let key = match p.state {
                ParticipantState::Available => "available",
                ParticipantState::Selected => "selected",
                ParticipantState::Training => "training",
                ParticipantState::Delivered => "delivered",
                ParticipantState::Dropped => "dropped",
            };
            *counts.entry(key).or_insert(0) += 1;
        }
        let mut history = self.history.clone();
        if let Some(a) = active {
            history.push(a.record.clone());
        }
        FederationStatus {
            phase: self.phase_name(),
            round: self.round,
            attempt: self.attempt,
            rounds: self.settings.rounds,
            participants,
            counts,
            history,
        }
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

    /// The round being run now and its attempt.
    pub fn current_round(&self) -> (u32, u32) {
        (self.round, self.attempt)
    }

    /// The open round's grants, for re-sending after the aggregator restarted.
    pub fn open_round_command(&self) -> Option<Command> {
        match &self.phase {
            Phase::Opening(a) | Phase::Training(a) | Phase::Closing(a) => {
                Some(Command::OpenRound {
                    round: self.round,
                    attempt: self.attempt,
                    grants: a.tokens.clone(),
                })
            }
            _ => None,
        }
    }
}

fn close_reason(active: &ActiveRound, now: Instant, round_timeout: Duration) -> Option<String> {
    let selected = active.tokens.len();
    let delivered = active.record.delivered.len();
    let dropped = active.record.dropped.len();
    if active.outstanding() == 0 {
        return Some(match (delivered, dropped) {
            (_, 0) => format!("all {selected} selected participants delivered"),
            (0, _) => format!("all {selected} selected participants dropped (heartbeat timeout)"),
            _ => format!(
                "{delivered} of {selected} selected participants delivered; \
                 {dropped} dropped (heartbeat timeout)"
            ),
        });
    }
    if now.duration_since(active.opened_at) >= round_timeout {
        return Some(format!(
            "round_timeout of {:.1} s reached with {delivered} of {selected} updates \
             ({dropped} dropped)",
            round_timeout.as_secs_f64()
        ));
    }
    None
}

/// 256 random bits, hex-encoded.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares secrets without an early exit, so timing does not reveal how much matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> FederationSettings {
        FederationSettings {
            rounds: 2,
            min_clients: 2,
            participants_ratio: 1.0,
            heartbeat_timeout: Duration::from_secs(5),
            round_timeout: Duration::from_secs(60),
        }
    }

    struct World {
        fed: Federation,
        now: Instant,
        people: Vec<(ParticipantId, String)>,
    }

    impl World {
        fn new(settings: FederationSettings, model_round: Option<u32>) -> Self {
            let mut fed = Federation::new(settings);
            fed.aggregator_attached(model_round, Instant::now());
            Self {
                fed,
                now: Instant::now(),
                people: Vec::new(),
            }
        }

        fn join(&mut self) -> usize {
            let p = self.fed.join(None, self.now);
            self.people.push(p);
            self.people.len() - 1
        }

        fn beat(&mut self, i: usize) -> Action {
            let (id, secret) = self.people[i].clone();
            self.fed.heartbeat(&id, &secret, self.now).unwrap()
        }

        fn advance(&mut self, secs: u64) {
            self.now += Duration::from_secs(secs);
        }

        fn id(&self, i: usize) -> &str {
            &self.people[i].0
        }

        /// Ticks and acknowledges an `OpenRound`; returns the grants.
        fn open(&mut self) -> BTreeMap<ParticipantId, String> {
            let commands = self.fed.tick(self.now);
            let Some(Command::OpenRound {
                round,
                attempt,
                grants,
            }) = commands.into_iter().next()
            else {
                panic!("expected OpenRound, phase {:?}", self.fed.phase_name());
            };
            self.fed.round_opened(round, attempt);
            grants
        }

        fn deliver(&mut self, i: usize, n: u64) {
            let (round, attempt) = self.fed.current_round();
            let id = self.id(i).to_string();
            self.fed
                .update_accepted(round, attempt, &id, n, BTreeMap::new());
        }

        fn close(&mut self, result: AggregationResult) {
            let commands = self.fed.tick(self.now);
            let (round, attempt) = self.fed.current_round();
            assert_eq!(commands, vec![Command::CloseRound { round, attempt }]);
            self.fed.round_aggregated(round, attempt, result, self.now);
        }
    }

    fn ok(updates: usize) -> AggregationResult {
        AggregationResult::Aggregated {
            updates,
            total_samples: 1,
        }
    }

    #[test]
    fn round_zero_selects_one_then_rounds_select_all() {
        let mut w = World::new(settings(), None);
        w.join();
        assert!(w.fed.tick(w.now).is_empty(), "min_clients is 2");
        w.join();
        let grants = w.open();
        assert_eq!(grants.len(), 1, "round 0 needs one initial model");
        let chosen = w
            .people
            .iter()
            .position(|p| grants.contains_key(&p.0))
            .unwrap();
        assert_eq!(
            w.beat(chosen),
            Action::Train {
                round: 0,
                attempt: 0
            }
        );
        assert_eq!(w.beat(1 - chosen), Action::Standby);
        let (id, secret) = w.people[chosen].clone();
        let grant = w.fed.start_training(&id, &secret, w.now).unwrap();
        assert!(!grant.has_global_model);
        assert_eq!(grant.token, grants[&id]);
        w.deliver(chosen, 1);
        w.close(ok(1));
        assert_eq!(w.fed.current_round(), (1, 0));
        assert_eq!(w.open().len(), 2);
        w.deliver(0, 10);
        w.deliver(1, 20);
        w.close(ok(2));
        w.open();
        w.deliver(0, 10);
        w.deliver(1, 20);
        w.close(ok(2));
        assert_eq!(w.fed.phase_name(), PhaseName::Finished);
        assert_eq!(w.beat(0), Action::Finish);
        let status = w.fed.status(w.now);
        assert_eq!(status.history.len(), 3);
        assert!(
            status
                .history
                .iter()
                .all(|r| r.outcome == Some("aggregated"))
        );
    }

    #[test]
    fn selection_follows_ratio_and_min_clients() {
        let mut s = settings();
        s.participants_ratio = 0.3;
        s.min_clients = 2;
        let mut w = World::new(s, Some(0));
        for _ in 0..10 {
            w.join();
        }
        assert_eq!(w.open().len(), 3, "ceil(0.3 × 10)");

        let mut s = settings();
        s.participants_ratio = 0.01;
        s.min_clients = 4;
        let mut w = World::new(s, Some(0));
        for _ in 0..10 {
            w.join();
        }
        assert_eq!(w.open().len(), 4, "never fewer than min_clients");

        let mut s = settings();
        s.participants_ratio = 0.0;
        s.min_clients = 0;
        let mut w = World::new(s, Some(0));
        w.join();
        assert_eq!(w.open().len(), 1, "never zero");
    }

    #[test]
    fn silent_selected_participant_is_dropped_and_round_closes_without_it() {
        let mut w = World::new(settings(), Some(0));
        for _ in 0..3 {
            w.join();
        }
        w.open();
        w.deliver(0, 5);
        w.deliver(1, 5);
        w.advance(3);
        w.beat(0);
        w.beat(1);
        assert!(w.fed.tick(w.now).is_empty(), "participant 2 still has time");
        w.advance(3);
        w.beat(0);
        w.beat(1);
        let (round, attempt) = w.fed.current_round();
        assert_eq!(
            w.fed.tick(w.now),
            vec![Command::CloseRound { round, attempt }]
        );
        w.fed.round_aggregated(round, attempt, ok(2), w.now);
        let status = w.fed.status(w.now);
        let record = &status.history[0];
        assert_eq!(record.dropped, vec![w.id(2).to_string()]);
        assert!(record.reason.as_deref().unwrap().contains("1 dropped"));
        assert!(matches!(w.beat(2), Action::Rejected { .. }));
        assert_eq!(status.participants[2].state, ParticipantState::Dropped);
    }

    #[test]
    fn late_joiner_waits_for_next_round_and_is_selected_then() {
        let mut w = World::new(settings(), Some(0));
        w.join();
        w.join();
        w.open();
        let late = w.join();
        assert_eq!(w.beat(late), Action::Standby);
        w.deliver(0, 1);
        w.deliver(1, 1);
        w.close(ok(2));
        let grants = w.open();
        assert!(grants.contains_key(w.id(late)));
        assert_eq!(
            w.beat(late),
            Action::Train {
                round: 2,
                attempt: 0
            }
        );
    }

    #[test]
    fn deadline_closes_round_and_empty_round_is_rerun() {
        let mut w = World::new(settings(), Some(0));
        w.join();
        w.join();
        w.open();
        for _ in 0..15 {
            w.advance(4);
            w.beat(0);
            w.beat(1);
            if !w.fed.tick(w.now).is_empty() {
                break;
            }
        }
        assert_eq!(w.fed.phase_name(), PhaseName::Closing);
        w.fed.round_aggregated(
            1,
            0,
            AggregationResult::Failed {
                reason: "no update was accepted".into(),
            },
            w.now,
        );
        assert_eq!(w.fed.current_round(), (1, 1));
        let status = w.fed.status(w.now);
        assert_eq!(status.history[0].outcome, Some("failed"));
        assert!(
            status.history[0]
                .reason
                .as_deref()
                .unwrap()
                .contains("round_timeout")
        );
        let grants = w.open();
        assert_eq!(grants.len(), 2, "same round, new attempt, new tokens");
    }

    #[test]
    fn repeated_and_stale_reports_count_once() {
        let mut w = World::new(settings(), Some(0));
        w.join();
        w.join();
        w.open();
        w.deliver(0, 7);
        w.deliver(0, 7);
        let id = w.id(1).to_string();
        w.fed.update_accepted(1, 5, &id, 9, BTreeMap::new());
        w.fed.update_accepted(0, 0, &id, 9, BTreeMap::new());
        let status = w.fed.status(w.now);
        assert_eq!(status.history[0].delivered, vec![w.id(0).to_string()]);
        assert_eq!(
            w.beat(0),
            Action::Standby,
            "delivered participants stand by"
        );
        assert_eq!(
            w.beat(1),
            Action::Train {
                round: 1,
                attempt: 0
            }
        );
    }

    #[test]
    fn bad_credentials_change_nothing() {
        let mut w = World::new(settings(), Some(0));
        w.join();
        let (id, _) = w.people[0].clone();
        assert_eq!(
            w.fed.heartbeat("nobody", "x", w.now),
            Err(FederationError::UnknownParticipant("nobody".into()))
        );
        w.advance(4);
        assert_eq!(
            w.fed.heartbeat(&id, "wrong", w.now),
            Err(FederationError::InvalidSecret(id.clone()))
        );
        w.advance(2);
        w.fed.tick(w.now);
        assert!(
            matches!(w.beat(0), Action::Rejected { .. }),
            "a wrong-secret heartbeat must not keep the participant alive"
        );
        assert_eq!(
            w.fed.start_training(&id, &w.people[0].1.clone(), w.now),
            Err(FederationError::NotSelected(id))
        );
    }

    #[test]
    fn a_restarted_aggregator_that_lost_rounds_rewinds_the_federation() {
        let mut w = World::new(settings(), Some(0));
        w.join();
        w.join();
        w.open();
        w.deliver(0, 1);
        w.deliver(1, 1);
        w.close(ok(2));
        w.open();
        assert_eq!(w.fed.current_round(), (2, 0));
        // Reconnecting to an aggregator that still has round 1's model changes nothing.
        assert_eq!(w.fed.aggregator_attached(Some(1), w.now), None);
        assert_eq!(w.fed.phase_name(), PhaseName::Training);
        // One that came back with only the initial model: round 2 fails, round 1 runs again.
        assert_eq!(w.fed.aggregator_attached(Some(0), w.now), Some(1));
        assert_eq!(w.fed.current_round(), (1, 1));
        let status = w.fed.status(w.now);
        let last = status.history.last().unwrap();
        assert_eq!((last.round, last.outcome), (2, Some("failed")));
        assert!(last.reason.as_deref().unwrap().contains("restarted"));
        assert_eq!(w.open().len(), 2);
    }

    #[test]
    fn open_round_is_resent_until_acknowledged() {
        let mut w = World::new(settings(), Some(0));
        w.join();
        w.join();
        let first = w.fed.tick(w.now);
        let again = w.fed.tick(w.now);
        assert_eq!(
            first, again,
            "same grants: the aggregator sees an idempotent retry"
        );
        assert_eq!(
            w.beat(0),
            Action::Standby,
            "no training before the aggregator knows"
        );
    }
}
