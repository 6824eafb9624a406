//! Property tests: random lives of a federation against a simulated aggregator, checked after
//! every event.
//!
//! A life is a random sequence of joins, heartbeats, silences, the clock advancing, ticks
//! (whose `OpenRound` the aggregator may or may not acknowledge), uploads, the aggregator's
//! notices delivered late and in order, notices delivered twice, notices for other rounds,
//! attempts or strangers, closes that aggregate or fail, and crashes of the coordinator (its
//! state saved through serde and read back). The simulated aggregator is truthful, as the real
//! one is: it accepts an update once per attempt from a participant it holds a grant for, and
//! its "round aggregated" names exactly what it accepted.
//!
//! After every event: an update counts at most once per attempt, and only if the aggregator
//! accepted it in that attempt; an attempt closes at most once; the history agrees with the
//! state and with the aggregator (round numbers only go forward, attempts of a round count up,
//! each aggregated record's contributors are the aggregator's and a subset of its selected
//! set, with at least its quorum; an attempt failed for want of a quorum was never sent to the
//! aggregator to close; counts agree between records and summaries). After the life: with
//! enough participants heartbeating, the federation aggregates another round (or finishes)
//! within bounded time; it never wedges.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::machine::Phase;
use super::*;

#[derive(Debug, Clone)]
enum Op {
    Join,
    /// A heartbeat from participant `p` (an index, modulo those who joined).
    Beat(usize),
    /// Every participant still alive heartbeats.
    BeatAll,
    StartTraining(usize),
    /// Participant `p` falls silent for good.
    Die(usize),
    /// The clock advances this many milliseconds.
    Advance(u64),
    /// The driver ticks; `ack`: the aggregator's acknowledgement of an `OpenRound` gets back.
    Tick {
        ack: bool,
    },
    /// Participant `p` uploads `n` samples' worth to the aggregator's open round.
    Upload {
        p: usize,
        n: u64,
    },
    /// Every participant alive that holds a grant of the aggregator's open round uploads.
    UploadAll,
    /// The first `k` notices in the aggregator's outbox reach the coordinator, in order.
    Deliver(usize),
    /// A notice delivered before is delivered again (a resend after a lost acknowledgement).
    Replay(usize),
    /// An "accepted" notice for another round or attempt, or a participant no one selected.
    StrayAccepted {
        p: usize,
        round_off: i8,
        attempt_off: i8,
        n: u64,
    },
    Rejected {
        p: usize,
        round_off: i8,
        attempt_off: i8,
        reason: u8,
    },
    /// The aggregator finishes the close it was asked for; `fail`: it cannot make a model.
    Aggregate {
        fail: bool,
    },
    /// The coordinator crashes and comes back from its last saved state.
    SaveRestore,
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0usize..64;
    prop_oneof![
        2 => Just(Op::Join),
        1 => p.clone().prop_map(Op::Beat),
        3 => Just(Op::BeatAll),
        1 => p.clone().prop_map(Op::StartTraining),
        1 => p.clone().prop_map(Op::Die),
        3 => (0u64..3_000).prop_map(Op::Advance),
        4 => any::<bool>().prop_map(|ack| Op::Tick { ack }),
        4 => (p.clone(), 1u64..100).prop_map(|(p, n)| Op::Upload { p, n }),
        1 => Just(Op::UploadAll),
        4 => (0usize..4).prop_map(Op::Deliver),
        1 => (0usize..1_000).prop_map(Op::Replay),
        1 => (p.clone(), -1i8..=1, -1i8..=1, 1u64..100).prop_map(|(p, round_off, attempt_off, n)| {
            Op::StrayAccepted { p, round_off, attempt_off, n }
        }),
        1 => (p, -1i8..=1, -1i8..=1, 0u8..3).prop_map(|(p, round_off, attempt_off, reason)| {
            Op::Rejected { p, round_off, attempt_off, reason }
        }),
        2 => prop::bool::weighted(0.2).prop_map(|fail| Op::Aggregate { fail }),
        1 => Just(Op::SaveRestore),
    ]
}

fn federation_settings() -> impl Strategy<Value = FederationSettings> {
    (
        1usize..=4,
        prop::sample::select(vec![0.25, 0.5, 1.0]),
        prop::sample::select(vec![1.0, 1.3, 2.0]),
        2u64..=5,
        4u64..=20,
        prop::option::of(1u64..=20),
        prop::sample::select(vec![2u32, 1_000]),
        0usize..4,
    )
        .prop_map(
            |(min_clients, ratio, overcommit, heartbeat, round, training, rounds, quorum)| {
                let round_timeout = Duration::from_secs(round);
                FederationSettings {
                    rounds,
                    min_clients,
                    participants_ratio: ratio,
                    heartbeat_timeout: Duration::from_secs(heartbeat),
                    round_timeout,
                    training_timeout: training.map(|t| Duration::from_secs(t).min(round_timeout)),
                    min_updates: 1 + quorum % min_clients,
                    selection_overcommit: overcommit,
                    evaluate_every: 0,
                    evaluate_fraction: 1.0,
                    join: JoinPolicy::default(),
                }
            },
        )
}

#[derive(Debug, Clone, PartialEq)]
enum Notice {
    Accepted {
        round: u32,
        attempt: u32,
        id: ParticipantId,
        n: u64,
    },
    Rejected {
        round: u32,
        attempt: u32,
        id: ParticipantId,
        reason: String,
    },
    Aggregated {
        round: u32,
        attempt: u32,
        result: AggregationResult,
    },
}

/// The aggregator as far as the coordinator can tell: rounds opened and closed, updates
/// accepted once per attempt, notices queued in order.
#[derive(Debug, Default)]
struct Aggregator {
    open: Option<OpenRound>,
    accepted: BTreeMap<ParticipantId, u64>,
    /// Closed but not finalized yet: what it had accepted.
    closing: Option<(u32, u32, BTreeMap<ParticipantId, u64>)>,
    closed: BTreeMap<(u32, u32), AggregationResult>,
    /// Every (round, attempt, participant) it ever accepted.
    ever_accepted: BTreeSet<(u32, u32, ParticipantId)>,
    outbox: VecDeque<Notice>,
    sent: Vec<Notice>,
}

impl Aggregator {
    fn open_round(&mut self, opening: &OpenRound) {
        let id = (opening.round, opening.attempt);
        if self.closed.contains_key(&id) || self.open.as_ref() == Some(opening) {
            return;
        }
        // Another attempt replaces the one it held, dropping that one's updates.
        self.open = Some(opening.clone());
        self.accepted.clear();
    }

    fn close_round(&mut self, round: u32, attempt: u32) {
        if let Some(result) = self.closed.get(&(round, attempt)) {
            // A repeated close re-sends the result.
            let result = result.clone();
            self.notify(Notice::Aggregated {
                round,
                attempt,
                result,
            });
            return;
        }
        if self
            .open
            .as_ref()
            .is_some_and(|o| (o.round, o.attempt) == (round, attempt))
        {
            self.open = None;
            self.closing = Some((round, attempt, std::mem::take(&mut self.accepted)));
        }
    }

    fn finalize(&mut self, fail: bool) {
        let Some((round, attempt, accepted)) = self.closing.take() else {
            return;
        };
        let result = if fail || accepted.is_empty() {
            AggregationResult::Failed {
                reason: "no model".into(),
            }
        } else {
            AggregationResult::Aggregated {
                updates: accepted.len(),
                total_samples: accepted.values().sum(),
                contributors: accepted,
            }
        };
        self.closed.insert((round, attempt), result.clone());
        self.notify(Notice::Aggregated {
            round,
            attempt,
            result,
        });
    }

    fn upload(&mut self, id: &str, n: u64) {
        let Some(open) = &self.open else { return };
        if !open.grants.contains_key(id) {
            return;
        }
        let (round, attempt) = (open.round, open.attempt);
        if self.accepted.contains_key(id) {
            self.notify(Notice::Rejected {
                round,
                attempt,
                id: id.to_string(),
                reason: "already_accepted".into(),
            });
            return;
        }
        self.accepted.insert(id.to_string(), n);
        self.ever_accepted.insert((round, attempt, id.to_string()));
        self.notify(Notice::Accepted {
            round,
            attempt,
            id: id.to_string(),
            n,
        });
    }

    fn notify(&mut self, notice: Notice) {
        self.outbox.push_back(notice.clone());
        self.sent.push(notice);
    }
}

struct Person {
    id: ParticipantId,
    secret: String,
    alive: bool,
}

struct Life {
    fed: Federation,
    agg: Aggregator,
    people: Vec<Person>,
    now: Timestamp,
    rng: StdRng,
    /// Attempts the coordinator asked the aggregator to close.
    closes_sent: HashSet<(u32, u32)>,
    /// Attempts whose "round aggregated" the coordinator took (`Some` from it).
    closed_here: HashSet<(u32, u32)>,
}

impl Life {
    fn new(settings: FederationSettings, model_round: Option<u32>, seed: u64) -> Self {
        let now = Timestamp::from_millis(1_000_000);
        let mut fed = Federation::new(settings);
        fed.aggregator_attached(model_round, now);
        Self {
            fed,
            agg: Aggregator::default(),
            people: Vec::new(),
            now,
            rng: StdRng::seed_from_u64(seed),
            closes_sent: HashSet::new(),
            closed_here: HashSet::new(),
        }
    }

    fn person(&self, p: usize) -> Option<&Person> {
        (!self.people.is_empty()).then(|| &self.people[p % self.people.len()])
    }

    fn join(&mut self) {
        let k = self.people.len();
        let id = format!("p{k}");
        let secret = token_from(&mut self.rng);
        let joining = Joining {
            // Some with names, some without: sentences name both kinds.
            name: k.is_multiple_of(2).then(|| format!("site-{k}")),
            ..Joining::default()
        };
        if self
            .fed
            .join(id.clone(), &secret, joining, self.now)
            .is_ok()
        {
            self.people.push(Person {
                id,
                secret,
                alive: true,
            });
        }
    }

    fn beat(&mut self, p: usize) {
        let Some(person) = self.person(p) else { return };
        if !person.alive {
            return;
        }
        let (id, secret) = (person.id.clone(), person.secret.clone());
        if let Ok(Action::Rejected { .. }) = self.fed.heartbeat(&id, &secret, self.now) {
            // Dropped: this identity is done (a real participant joins again, as a new one).
            let k = p % self.people.len();
            self.people[k].alive = false;
        }
    }

    fn beat_all(&mut self) {
        for p in 0..self.people.len() {
            self.beat(p);
        }
    }

    fn tick(&mut self, ack: bool) {
        for command in self.fed.tick(self.now, &mut self.rng) {
            match command {
                Command::OpenRound(opening) => {
                    self.agg.open_round(&opening);
                    if ack {
                        self.fed
                            .round_opened(opening.round, opening.attempt, self.now);
                    }
                }
                Command::CloseRound { round, attempt } => {
                    self.closes_sent.insert((round, attempt));
                    self.agg.close_round(round, attempt);
                }
            }
        }
    }

    fn hear(&mut self, notice: Notice) -> Result<(), TestCaseError> {
        match notice {
            Notice::Accepted {
                round,
                attempt,
                id,
                n,
            } => {
                let metrics = BTreeMap::from([("loss".to_string(), 0.5)]);
                self.fed.update_accepted(round, attempt, &id, n, metrics);
            }
            Notice::Rejected {
                round,
                attempt,
                id,
                reason,
            } => self.fed.update_rejected(round, attempt, &id, reason),
            Notice::Aggregated {
                round,
                attempt,
                result,
            } => {
                if self
                    .fed
                    .round_aggregated(round, attempt, result, self.now)
                    .is_some()
                {
                    prop_assert!(
                        self.closed_here.insert((round, attempt)),
                        "round {round} attempt {attempt} closed twice"
                    );
                }
            }
        }
        Ok(())
    }

    fn deliver(&mut self, k: usize) -> Result<(), TestCaseError> {
        for _ in 0..k {
            let Some(notice) = self.agg.outbox.pop_front() else {
                break;
            };
            self.hear(notice)?;
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let (round, attempt) = self.fed.current_round();
        let shift = |base: u32, off: i8| base.saturating_add_signed(i32::from(off));
        match op.clone() {
            Op::Join => self.join(),
            Op::Beat(p) => self.beat(p),
            Op::BeatAll => self.beat_all(),
            Op::StartTraining(p) => {
                if let Some(person) = self.person(p).filter(|person| person.alive) {
                    let (id, secret) = (person.id.clone(), person.secret.clone());
                    let _ = self.fed.start_training(&id, &secret, self.now);
                }
            }
            Op::Die(p) => {
                if !self.people.is_empty() {
                    let k = p % self.people.len();
                    self.people[k].alive = false;
                }
            }
            Op::Advance(ms) => self.now = self.now + Duration::from_millis(ms),
            Op::Tick { ack } => self.tick(ack),
            Op::Upload { p, n } => {
                if let Some(person) = self.person(p).filter(|person| person.alive) {
                    let id = person.id.clone();
                    self.agg.upload(&id, n);
                }
            }
            Op::UploadAll => {
                let alive: Vec<ParticipantId> = self
                    .people
                    .iter()
                    .filter(|x| x.alive)
                    .map(|x| x.id.clone())
                    .collect();
                for (k, id) in alive.iter().enumerate() {
                    self.agg.upload(id, 1 + k as u64);
                }
            }
            Op::Deliver(k) => self.deliver(k)?,
            Op::Replay(k) => {
                if !self.agg.sent.is_empty() {
                    let notice = self.agg.sent[k % self.agg.sent.len()].clone();
                    self.hear(notice)?;
                }
            }
            Op::StrayAccepted {
                p,
                round_off,
                attempt_off,
                n,
            } => {
                let (r, a) = (shift(round, round_off), shift(attempt, attempt_off));
                // For the attempt running now, only a stranger: a selected participant's
                // notice there is the aggregator's word, which the simulation keeps truthful.
                let id = if (r, a) == (round, attempt) {
                    format!("stranger-{p}")
                } else {
                    self.person(p)
                        .map_or_else(|| format!("stranger-{p}"), |x| x.id.clone())
                };
                self.hear(Notice::Accepted {
                    round: r,
                    attempt: a,
                    id,
                    n,
                })?;
            }
            Op::Rejected {
                p,
                round_off,
                attempt_off,
                reason,
            } => {
                let id = self
                    .person(p)
                    .map_or_else(|| format!("stranger-{p}"), |x| x.id.clone());
                self.hear(Notice::Rejected {
                    round: shift(round, round_off),
                    attempt: shift(attempt, attempt_off),
                    id,
                    reason: format!("invalid_update: {reason}"),
                })?;
            }
            Op::Aggregate { fail } => self.agg.finalize(fail),
            Op::SaveRestore => {
                let saved = serde_json::to_string(&self.fed).expect("the federation serializes");
                let restored: Federation = serde_json::from_str(&saved).expect("and reads back");
                prop_assert_eq!(&restored, &self.fed);
                self.fed = restored;
            }
        }
        Ok(())
    }

    fn aggregated_rounds(&self) -> usize {
        self.fed
            .round_summaries()
            .iter()
            .filter(|s| s.outcome == Some(Outcome::Aggregated))
            .count()
    }

    /// Everything that must hold whatever happened.
    fn check(&self) -> Result<(), TestCaseError> {
        let fed = &self.fed;
        let running = fed.active().map(|a| &a.record);
        for record in fed.history.iter().chain(running) {
            self.check_record(record)?;
        }
        for record in &fed.history {
            self.check_closed(record)?;
        }
        // Attempts follow one another: after an aggregated round the next round's first
        // attempt, after a failed attempt the same round's next one.
        let lines = fed.round_summaries();
        prop_assert_eq!(
            lines.len() as u64,
            fed.history.len() as u64 + fed.history_forgotten
        );
        for pair in lines.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let next = match a.outcome {
                Some(Outcome::Aggregated) => (a.round + 1, 0),
                _ => (a.round, a.attempt + 1),
            };
            prop_assert_eq!(
                (b.round, b.attempt),
                next,
                "history out of order: {:?}",
                lines
            );
        }
        if let Some(last) = lines.last() {
            let next = match last.outcome {
                Some(Outcome::Aggregated) => (last.round + 1, 0),
                _ => (last.round, last.attempt + 1),
            };
            if !matches!(fed.phase, Phase::Finished) {
                prop_assert_eq!(fed.current_round(), next);
            }
        }
        // The summaries say what the records say.
        let kept = &lines[lines.len() - fed.history.len()..];
        for (line, record) in kept.iter().zip(&fed.history) {
            prop_assert_eq!((line.round, line.attempt), (record.round, record.attempt));
            prop_assert_eq!(line.selected, record.selected.len());
            prop_assert_eq!(line.delivered, record.delivered.len());
            prop_assert_eq!(line.outcome, record.outcome);
            prop_assert_eq!(line.close_reason, record.close_reason);
            prop_assert_eq!(&line.missed_deadline, &record.missed_deadline);
            let samples: u64 = record.deliveries.iter().map(|d| d.n_samples).sum();
            prop_assert_eq!(line.total_samples, samples);
        }
        // The running attempt counts only what the aggregator accepted in it, once each.
        if let Some(record) = running {
            for id in &record.delivered {
                let key = (record.round, record.attempt, id.clone());
                prop_assert!(
                    self.agg.ever_accepted.contains(&key),
                    "{id} counted in round {} attempt {} without an accepted update",
                    record.round,
                    record.attempt
                );
            }
            if let Some(a) = fed.active() {
                prop_assert_eq!(a.delivered.len(), record.delivered.len());
                prop_assert_eq!(a.missed.len(), record.missed_deadline.len());
                prop_assert_eq!(a.dropped.len(), record.dropped.len());
            }
        }
        Ok(())
    }

    fn check_record(&self, record: &RoundRecord) -> Result<(), TestCaseError> {
        let selected: BTreeSet<&ParticipantId> = record.selected.iter().collect();
        prop_assert_eq!(selected.len(), record.selected.len(), "selected twice");
        let set =
            |ids: &[ParticipantId], what: &str| -> Result<BTreeSet<ParticipantId>, TestCaseError> {
                let unique: BTreeSet<ParticipantId> = ids.iter().cloned().collect();
                prop_assert_eq!(
                    unique.len(),
                    ids.len(),
                    "{} lists someone twice: {:?}",
                    what,
                    ids
                );
                prop_assert!(
                    unique.iter().all(|id| selected.contains(id)),
                    "{} names someone not selected: {:?} of {:?}",
                    what,
                    ids,
                    record.selected
                );
                Ok(unique)
            };
        let delivered = set(&record.delivered, "delivered")?;
        let dropped = set(&record.dropped, "dropped")?;
        let missed = set(&record.missed_deadline, "missed_deadline")?;
        prop_assert!(delivered.is_disjoint(&dropped) && delivered.is_disjoint(&missed));
        prop_assert!(dropped.is_disjoint(&missed));
        let delivery_ids: Vec<&ParticipantId> = record
            .deliveries
            .iter()
            .map(|d| &d.participant_id)
            .collect();
        prop_assert_eq!(delivery_ids, record.delivered.iter().collect::<Vec<_>>());
        prop_assert!(1 <= record.quorum && record.quorum <= record.target);
        prop_assert!(record.target <= record.selected.len());
        Ok(())
    }

    fn check_closed(&self, record: &RoundRecord) -> Result<(), TestCaseError> {
        let id = (record.round, record.attempt);
        let reason = record.close_reason;
        prop_assert!(record.reason.is_some(), "{:?} closed without words", id);
        match record.outcome {
            Some(Outcome::Aggregated) => {
                prop_assert!(matches!(
                    reason,
                    Some(
                        CloseReason::AllDelivered
                            | CloseReason::TargetReached
                            | CloseReason::TrainingDeadline
                            | CloseReason::ParticipantsDropped
                            | CloseReason::RoundTimeout
                    )
                ));
                let Some(AggregationResult::Aggregated { contributors, .. }) =
                    self.agg.closed.get(&id)
                else {
                    return Err(TestCaseError::fail(format!(
                        "{id:?} aggregated here but not at the aggregator"
                    )));
                };
                let theirs: BTreeMap<&ParticipantId, u64> =
                    contributors.iter().map(|(k, v)| (k, *v)).collect();
                let ours: BTreeMap<&ParticipantId, u64> = record
                    .deliveries
                    .iter()
                    .map(|d| (&d.participant_id, d.n_samples))
                    .collect();
                prop_assert_eq!(ours, theirs, "the record follows the aggregator");
                prop_assert!(
                    record.delivered.len() >= record.quorum,
                    "{:?} aggregated {} updates, short of its quorum {}",
                    id,
                    record.delivered.len(),
                    record.quorum
                );
                prop_assert!(self.closed_here.contains(&id));
            }
            Some(Outcome::Failed) => match reason {
                Some(CloseReason::QuorumUnreachable | CloseReason::QuorumTimeout) => {
                    prop_assert!(
                        !self.closes_sent.contains(&id),
                        "{:?} failed for its quorum yet was sent to be aggregated",
                        id
                    );
                    prop_assert!(record.delivered.len() < record.quorum);
                }
                Some(CloseReason::AggregationFailed) => {
                    let failed_there = matches!(
                        self.agg.closed.get(&id),
                        Some(AggregationResult::Failed { .. })
                    );
                    prop_assert!(failed_there, "{:?} failed here, not at the aggregator", id);
                }
                other => {
                    return Err(TestCaseError::fail(format!("{id:?} failed with {other:?}")));
                }
            },
            None => return Err(TestCaseError::fail(format!("{id:?} closed, no outcome"))),
        }
        Ok(())
    }

    /// Enough participants heartbeat and train, the aggregator answers everything: within
    /// bounded time another round aggregates, or the federation finishes.
    fn heal(&mut self) -> Result<(), TestCaseError> {
        let aggregated = self.aggregated_rounds();
        for _ in 0..self.fed.settings.min_clients {
            self.join();
        }
        // 200 s: beyond every timeout the settings draw, several times over.
        for _ in 0..800 {
            if matches!(self.fed.phase, Phase::Finished) || self.aggregated_rounds() > aggregated {
                return Ok(());
            }
            self.now = self.now + Duration::from_millis(250);
            self.beat_all();
            self.tick(true);
            let grants: Vec<ParticipantId> = match (&self.fed.phase, &self.agg.open) {
                (Phase::Training(_), Some(open)) => open.grants.keys().cloned().collect(),
                _ => Vec::new(),
            };
            for id in grants {
                if let Some(person) = self.people.iter().find(|x| x.id == id && x.alive) {
                    let secret = person.secret.clone();
                    if self.fed.start_training(&id, &secret, self.now).is_ok() {
                        self.agg.upload(&id, 10);
                    }
                }
            }
            self.deliver(usize::MAX)?;
            self.agg.finalize(false);
            self.deliver(usize::MAX)?;
            self.check()?;
        }
        Err(TestCaseError::fail(format!(
            "wedged: phase {:?}, round {:?}",
            self.fed.phase_name(),
            self.fed.current_round()
        )))
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_life_keeps_the_invariants_and_never_wedges(
        settings in federation_settings(),
        model_round in prop::option::of(0u32..2),
        seed in any::<u64>(),
        ops in prop::collection::vec(op(), 1..160),
    ) {
        let mut life = Life::new(settings, model_round, seed);
        life.check()?;
        for op in &ops {
            life.apply(op)?;
            life.check()?;
        }
        life.heal()?;
    }
}
