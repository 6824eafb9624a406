//! The state machine driven through whole rounds, with a clock and randomness of the test's.

use super::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

fn settings() -> FederationSettings {
    FederationSettings {
        rounds: 2,
        min_clients: 2,
        participants_ratio: 1.0,
        heartbeat_timeout: Duration::from_secs(5),
        round_timeout: Duration::from_secs(60),
        training_timeout: None,
        min_updates: 1,
        selection_overcommit: 1.0,
        evaluate_every: 0,
        evaluate_fraction: 1.0,
        join: JoinPolicy::default(),
    }
}

struct World {
    fed: Federation,
    now: Timestamp,
    people: Vec<(ParticipantId, String)>,
    rng: StdRng,
}

impl World {
    fn new(settings: FederationSettings, model_round: Option<u32>) -> Self {
        let mut fed = Federation::new(settings);
        let now = Timestamp::from_millis(1_000_000);
        fed.aggregator_attached(model_round, now);
        Self {
            fed,
            now,
            people: Vec::new(),
            rng: StdRng::seed_from_u64(7),
        }
    }

    fn join(&mut self) -> usize {
        let id = format!("p{}", self.people.len());
        let secret = token_from(&mut self.rng);
        self.fed
            .join(
                id.clone(),
                &secret,
                Joining {
                    can_evaluate: true,
                    ..Joining::default()
                },
                self.now,
            )
            .unwrap();
        self.people.push((id, secret));
        self.people.len() - 1
    }

    fn beat(&mut self, i: usize) -> Action {
        let (id, secret) = self.people[i].clone();
        self.fed.heartbeat(&id, &secret, self.now).unwrap()
    }

    fn advance(&mut self, secs: u64) {
        self.now = self.now + Duration::from_secs(secs);
    }

    fn id(&self, i: usize) -> &str {
        &self.people[i].0
    }

    /// Ticks and acknowledges an `OpenRound`; returns the grants.
    fn open(&mut self) -> BTreeMap<ParticipantId, String> {
        let commands = self.tick();
        let Some(Command::OpenRound(OpenRound {
            round,
            attempt,
            grants,
        })) = commands.into_iter().next()
        else {
            panic!("expected OpenRound, phase {:?}", self.fed.phase_name());
        };
        self.fed.round_opened(round, attempt, self.now);
        grants
    }

    fn deliver(&mut self, i: usize, n: u64) {
        let (round, attempt) = self.fed.current_round();
        let id = self.id(i).to_string();
        self.fed
            .update_accepted(round, attempt, &id, n, BTreeMap::new());
    }

    fn tick(&mut self) -> Vec<Command> {
        self.fed.tick(self.now, &mut self.rng)
    }

    fn close(&mut self, result: AggregationResult) -> Option<RoundClosed> {
        let commands = self.tick();
        let (round, attempt) = self.fed.current_round();
        assert_eq!(commands, vec![Command::CloseRound { round, attempt }]);
        self.fed.round_aggregated(round, attempt, result, self.now)
    }
}

/// The history's records, closed then running, owned.
fn records(fed: &Federation) -> Vec<RoundRecord> {
    fed.history().cloned().collect()
}

/// The result an aggregator that heard the same notices as the coordinator reports.
fn agreed(fed: &Federation) -> AggregationResult {
    let record = fed.history().last().expect("a round is running");
    let contributors: BTreeMap<_, _> = record
        .deliveries
        .iter()
        .map(|d| (d.participant_id.clone(), d.n_samples))
        .collect();
    AggregationResult::Aggregated {
        updates: contributors.len(),
        total_samples: contributors.values().sum(),
        contributors,
    }
}

#[test]
fn round_zero_selects_one_then_rounds_select_all() {
    let mut w = World::new(settings(), None);
    w.join();
    assert!(w.tick().is_empty(), "min_clients is 2");
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
    w.close(agreed(&w.fed));
    assert_eq!(w.fed.current_round(), (1, 0));
    assert_eq!(w.open().len(), 2);
    w.deliver(0, 10);
    w.deliver(1, 20);
    w.close(agreed(&w.fed));
    w.open();
    w.deliver(0, 10);
    w.deliver(1, 20);
    w.close(agreed(&w.fed));
    assert_eq!(w.fed.phase_name(), PhaseName::Finished);
    assert_eq!(w.beat(0), Action::Finish);
    assert_eq!(w.fed.history().count(), 3);
    assert!(
        w.fed
            .history()
            .all(|r| r.outcome == Some(Outcome::Aggregated))
    );
}

#[test]
fn a_federation_saved_mid_round_carries_on_where_it_was() {
    let mut w = World::new(settings(), Some(0));
    w.join();
    w.join();
    let grants = w.open();
    let (id, secret) = w.people[0].clone();
    w.fed.start_training(&id, &secret, w.now).unwrap();
    w.deliver(0, 10);
    // What a store would write and a restarted coordinator read back.
    let saved = serde_json::to_string(&w.fed).expect("the federation serializes");
    let restored: Federation = serde_json::from_str(&saved).expect("and reads back");
    assert_eq!(restored, w.fed);
    let mut copy = World {
        fed: restored,
        now: w.now,
        people: w.people.clone(),
        rng: StdRng::seed_from_u64(7),
    };
    let (other, other_secret) = w.people[1].clone();
    for world in [&mut w, &mut copy] {
        assert_eq!(world.fed.current_round(), (1, 0));
        let grant = world.fed.start_training(&other, &other_secret, world.now);
        assert_eq!(grant.unwrap().token, grants[&other], "the grant survives");
        let again = world.fed.start_training(&id, &secret, world.now);
        assert!(again.is_err(), "p0 has delivered");
        world.deliver(1, 20);
        world.close(agreed(&world.fed));
        assert_eq!(world.fed.current_round(), (2, 0));
    }
    assert_eq!(records(&copy.fed), records(&w.fed));
    let last = &copy.fed.history().next().unwrap();
    assert_eq!(last.delivered, vec!["p0".to_string(), "p1".to_string()]);
}

#[test]
fn a_resumed_federation_gives_its_participants_a_heartbeat_timeout_to_show_up() {
    let mut w = World::new(settings(), Some(0));
    w.join();
    w.join();
    w.open();
    let saved = serde_json::to_string(&w.fed).expect("serializes");
    // The coordinator was down for longer than the heartbeat timeout.
    w.advance(60);
    let mut restored: Federation = serde_json::from_str(&saved).expect("reads back");
    let mut newer = settings();
    newer.rounds = 5;
    assert!(
        restored.resume(newer.clone(), w.now),
        "the settings changed"
    );
    assert_eq!(restored.settings(), &newer);
    restored.tick(w.now, &mut w.rng);
    assert_eq!(restored.current_round().0, 1, "the same round goes on");
    assert!(
        restored
            .participants()
            .all(|p| p.state != ParticipantState::Dropped),
        "nobody is dropped for the coordinator's downtime: {:?}",
        restored.participants().collect::<Vec<_>>()
    );
    // Silent for a heartbeat timeout after the restart, they are.
    w.advance(6);
    restored.tick(w.now, &mut w.rng);
    assert!(
        restored
            .participants()
            .all(|p| p.state == ParticipantState::Dropped),
        "{:?}",
        restored.participants().collect::<Vec<_>>()
    );
}

#[test]
fn an_update_accepted_before_the_opening_is_acknowledged_here_counts() {
    // A coordinator restored from a save taken between OpenRound and its acknowledgement
    // hears of an update the aggregator accepted before it sees the acknowledgement again.
    let mut w = World::new(settings(), Some(0));
    w.join();
    w.join();
    let commands = w.tick();
    let Some(Command::OpenRound(opening)) = commands.into_iter().next() else {
        panic!("expected OpenRound");
    };
    let id = w.id(0).to_string();
    w.fed
        .update_accepted(opening.round, opening.attempt, &id, 10, BTreeMap::new());
    w.fed.round_opened(opening.round, opening.attempt, w.now);
    let running = w.fed.history().last().expect("the running round");
    assert_eq!(running.delivered, vec![id]);
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
    assert!(w.tick().is_empty(), "participant 2 still has time");
    w.advance(3);
    w.beat(0);
    w.beat(1);
    let (round, attempt) = w.fed.current_round();
    assert_eq!(w.tick(), vec![Command::CloseRound { round, attempt }]);
    let result = agreed(&w.fed);
    w.fed.round_aggregated(round, attempt, result, w.now);
    let record = w.fed.history().next().unwrap();
    assert_eq!(record.dropped, vec![w.id(2).to_string()]);
    assert_eq!(record.close_reason, Some(CloseReason::ParticipantsDropped));
    assert_eq!(
        record.reason.as_deref(),
        Some("round 1: 2 of 3 updates; p2 dropped (heartbeat timeout)")
    );
    assert!(matches!(w.beat(2), Action::Rejected { .. }));
    let states: Vec<_> = w.fed.participants().map(|p| p.state).collect();
    assert_eq!(states[2], ParticipantState::Dropped);
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
    w.close(agreed(&w.fed));
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
fn a_round_with_no_update_at_its_deadline_fails_here_and_is_rerun() {
    let mut w = World::new(settings(), Some(0));
    w.join();
    w.join();
    w.open();
    let mut commands = Vec::new();
    for _ in 0..15 {
        w.advance(4);
        w.beat(0);
        w.beat(1);
        commands.extend(w.tick());
        if w.fed.phase_name() != PhaseName::Training {
            break;
        }
    }
    // No quorum (min_updates = 1): nothing to ask the aggregator to aggregate.
    assert_eq!(
        commands,
        vec![],
        "no CloseRound for a round without its quorum"
    );
    assert_eq!(w.fed.phase_name(), PhaseName::WaitingForParticipants);
    assert_eq!(w.fed.current_round(), (1, 1));
    let record = w.fed.history().next().unwrap().clone();
    assert_eq!(record.outcome, Some(Outcome::Failed));
    assert_eq!(record.close_reason, Some(CloseReason::QuorumTimeout));
    assert_eq!(record.missed_deadline, vec!["p0".to_string(), "p1".into()]);
    assert_eq!(
        record.reason.as_deref(),
        Some(
            "round 1 attempt 0 failed: 0 of 2 updates, short of the quorum of 1 (min_updates); \
             p0 and p1 had not delivered at round_timeout (60 s); the round is run again"
        )
    );
    let grants = w.open();
    assert_eq!(grants.len(), 2, "same round, new attempt, new tokens");
}

#[test]
fn a_round_the_aggregator_fails_is_rerun_and_says_why_in_both_words_and_code() {
    let mut w = World::new(settings(), Some(0));
    w.join();
    w.join();
    w.open();
    w.deliver(0, 5);
    w.deliver(1, 5);
    w.close(AggregationResult::Failed {
        reason: "Krum needs more than 2f + 2 updates".into(),
    });
    assert_eq!(w.fed.current_round(), (1, 1));
    let record = w.fed.history().next().unwrap().clone();
    assert_eq!(record.close_reason, Some(CloseReason::AggregationFailed));
    assert_eq!(
        record.reason.as_deref(),
        Some(
            "round 1 attempt 0 failed: the aggregator could not make a model: Krum needs more \
             than 2f + 2 updates; it had closed with 2 of 2 updates; every selected participant \
             delivered; the round is run again"
        )
    );
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
    assert_eq!(
        w.fed.history().next().unwrap().delivered,
        vec![w.id(0).to_string()]
    );
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
    w.tick();
    assert!(
        matches!(w.beat(0), Action::Rejected { .. }),
        "a wrong-secret heartbeat must not keep the participant alive"
    );
    assert_eq!(
        w.fed.start_training(&id, &w.people[0].1.clone(), w.now),
        Err(FederationError::CredentialExpired(id))
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
    w.close(agreed(&w.fed));
    w.open();
    assert_eq!(w.fed.current_round(), (2, 0));
    // Reconnecting to an aggregator that still has round 1's model changes nothing.
    assert_eq!(w.fed.aggregator_attached(Some(1), w.now), None);
    assert_eq!(w.fed.phase_name(), PhaseName::Training);
    // One that came back with only the initial model: round 2 fails, round 1 runs again.
    assert_eq!(w.fed.aggregator_attached(Some(0), w.now), Some(1));
    assert_eq!(w.fed.current_round(), (1, 1));
    let last = w.fed.history().last().unwrap();
    assert_eq!((last.round, last.outcome), (2, Some(Outcome::Failed)));
    assert!(last.reason.as_deref().unwrap().contains("restarted"));
    assert_eq!(w.open().len(), 2);
}

#[test]
fn open_round_is_resent_until_acknowledged() {
    let mut w = World::new(settings(), Some(0));
    w.join();
    w.join();
    let first = w.tick();
    let again = w.tick();
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

fn aggregated(contributors: &[(&str, u64)]) -> AggregationResult {
    let contributors: BTreeMap<_, _> = contributors
        .iter()
        .map(|(id, n)| (id.to_string(), *n))
        .collect();
    AggregationResult::Aggregated {
        updates: contributors.len(),
        total_samples: contributors.values().sum(),
        contributors,
    }
}

fn metrics(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// Runs a round to its deadline with only participant 0's notice heard, so that it closes
/// with participant 1 still outstanding.
fn round_closing_with_one_notice(w: &mut World) -> (u32, u32) {
    w.open();
    let (round, attempt) = w.fed.current_round();
    let id0 = w.id(0).to_string();
    w.fed
        .update_accepted(round, attempt, &id0, 5, metrics(&[("loss", 0.25)]));
    for _ in 0..16 {
        w.advance(4);
        w.beat(0);
        w.beat(1);
        if !w.tick().is_empty() {
            break;
        }
    }
    assert_eq!(w.fed.phase_name(), PhaseName::Closing);
    (round, attempt)
}

#[test]
fn accepted_notice_after_round_aggregated_still_counts_the_contributor() {
    let mut w = World::new(settings(), Some(0));
    w.join();
    w.join();
    let (round, attempt) = round_closing_with_one_notice(&mut w);
    let (id0, id1) = (w.id(0).to_string(), w.id(1).to_string());
    // The aggregator folded both updates; participant 1's notice is still on its way.
    let closed = w
        .fed
        .round_aggregated(round, attempt, aggregated(&[(&id0, 5), (&id1, 7)]), w.now)
        .expect("news");
    assert_eq!(closed.discrepancies, Vec::<String>::new());
    let record = w.fed.history().next().unwrap().clone();
    assert_eq!(record.delivered, vec![id0.clone(), id1.clone()]);
    assert_eq!(
        record.deliveries,
        vec![
            Delivery {
                participant_id: id0.clone(),
                n_samples: 5,
                metrics: metrics(&[("loss", 0.25)]),
                metrics_dropped: 0,
            },
            Delivery {
                participant_id: id1.clone(),
                n_samples: 7,
                metrics: BTreeMap::new(),
                metrics_dropped: 0,
            },
        ]
    );
    // The late notice brings its metrics and nothing else.
    w.fed
        .update_accepted(round, attempt, &id1, 7, metrics(&[("loss", 0.5)]));
    w.fed
        .update_accepted(round, attempt, &id1, 7, metrics(&[("loss", 9.0)]));
    let record = w.fed.history().next().unwrap().clone();
    assert_eq!(record.delivered, vec![id0, id1]);
    assert_eq!(record.deliveries[1].metrics, metrics(&[("loss", 0.5)]));
    assert_eq!(w.fed.current_round(), (round + 1, 0));
}

#[test]
fn a_participant_reported_accepted_but_not_aggregated_is_not_delivered() {
    let mut w = World::new(settings(), Some(0));
    w.join();
    w.join();
    w.open();
    let (round, attempt) = w.fed.current_round();
    w.deliver(0, 5);
    w.deliver(1, 9);
    w.close(aggregated(&[(w.id(1), 9)]))
        .expect("news")
        .discrepancies
        .iter()
        .find(|d| d.contains(w.id(0)) && d.contains("not in the aggregated model"))
        .expect("the disagreement is reported");
    let record = w.fed.history().next().unwrap().clone();
    assert_eq!((record.round, record.attempt), (round, attempt));
    assert_eq!(record.delivered, vec![w.id(1).to_string()]);
    assert_eq!(record.deliveries.len(), 1);
    assert_eq!(record.deliveries[0].n_samples, 9);
}

#[test]
fn the_aggregators_sample_counts_win_and_inconsistent_totals_are_reported() {
    let mut w = World::new(settings(), Some(0));
    w.join();
    w.join();
    w.open();
    w.deliver(0, 5);
    w.deliver(1, 9);
    let (id0, id1) = (w.id(0).to_string(), w.id(1).to_string());
    let closed = w
        .close(AggregationResult::Aggregated {
            updates: 3,
            total_samples: 100,
            contributors: BTreeMap::from([(id0.clone(), 6), (id1.clone(), 9)]),
        })
        .expect("news");
    assert_eq!(closed.discrepancies.len(), 3, "{:?}", closed.discrepancies);
    let record = w.fed.history().next().unwrap().clone();
    assert_eq!(record.delivered, vec![id0, id1]);
    assert_eq!(
        record
            .deliveries
            .iter()
            .map(|d| d.n_samples)
            .collect::<Vec<_>>(),
        vec![6, 9]
    );
}

#[test]
fn a_dropped_participant_whose_update_was_aggregated_counts_as_delivered() {
    let mut w = World::new(settings(), Some(0));
    w.join();
    w.join();
    w.open();
    w.deliver(0, 5);
    w.advance(6);
    w.beat(0);
    w.tick();
    assert_eq!(w.fed.phase_name(), PhaseName::Closing);
    let (round, attempt) = w.fed.current_round();
    let (id0, id1) = (w.id(0).to_string(), w.id(1).to_string());
    w.fed
        .round_aggregated(round, attempt, aggregated(&[(&id0, 5), (&id1, 3)]), w.now);
    let record = w.fed.history().next().unwrap().clone();
    assert_eq!(record.delivered, vec![id0, id1]);
    assert!(record.dropped.is_empty());
}

#[test]
fn history_and_status_stay_bounded_over_many_rounds_with_big_metrics() {
    let mut s = settings();
    s.rounds = 1_000;
    let mut w = World::new(s, Some(0));
    w.join();
    w.join();
    let huge: BTreeMap<String, f64> = (0..200)
        .map(|i| (format!("{i:0>200}"), 1.0))
        .chain((0..100).map(|i| (format!("m{i:03}"), 0.5)))
        .collect();
    let mut sizes = Vec::new();
    for round in 1..=300 {
        w.open();
        let (r, a) = w.fed.current_round();
        for i in 0..2 {
            let id = w.id(i).to_string();
            w.fed.update_accepted(r, a, &id, 1, huge.clone());
            for k in 0..20 {
                w.fed.update_rejected(
                    r,
                    a,
                    &id,
                    format!("invalid_update: {k} {}", "x".repeat(5000)),
                );
            }
        }
        w.close(agreed(&w.fed));
        if round % 100 == 0 {
            sizes.push(serde_json::to_vec(&records(&w.fed)).unwrap().len());
        }
    }
    let history = records(&w.fed);
    assert_eq!(history.len(), HISTORY_ROUNDS);
    assert_eq!(w.fed.history_forgotten(), 300 - HISTORY_ROUNDS as u64);
    assert_eq!(history.last().unwrap().round, 300);
    let delivery = &history[0].deliveries[0];
    assert_eq!(delivery.metrics.len(), MAX_METRICS_PER_DELIVERY);
    assert_eq!(delivery.metrics_dropped, 300 - MAX_METRICS_PER_DELIVERY);
    assert!(
        delivery
            .metrics
            .keys()
            .all(|k| k.len() <= MAX_METRIC_NAME_BYTES)
    );
    let record = &history[0];
    assert_eq!(record.rejections.len(), 2 * MAX_REJECTIONS_PER_PARTICIPANT);
    assert_eq!(
        record.rejections_dropped,
        2 * (20 - MAX_REJECTIONS_PER_PARTICIPANT)
    );
    assert!(
        record
            .rejections
            .iter()
            .all(|r| r.reason.len() <= MAX_REJECTION_REASON_BYTES)
    );
    // Only the digits of larger round numbers may grow it.
    assert!(sizes[2] - sizes[0] < 1_000, "{sizes:?}");
    assert!(sizes[2] < 2_000_000, "{sizes:?}");
}

#[test]
fn non_finite_metrics_are_dropped_and_counted() {
    let mut w = World::new(settings(), Some(0));
    w.join();
    w.join();
    w.open();
    let (r, a) = w.fed.current_round();
    let id = w.id(0).to_string();
    w.fed.update_accepted(
        r,
        a,
        &id,
        3,
        metrics(&[("loss", 0.5), ("nan", f64::NAN), ("inf", f64::INFINITY)]),
    );
    let delivery = w.fed.history().next().unwrap().deliveries[0].clone();
    assert_eq!(delivery.metrics, metrics(&[("loss", 0.5)]));
    assert_eq!(delivery.metrics_dropped, 2);
}

#[test]
fn joining_under_a_taken_id_is_refused_and_changes_nothing() {
    let mut w = World::new(settings(), Some(0));
    w.join();
    let (id, secret) = w.people[0].clone();
    assert_eq!(
        w.fed.join(
            id.clone(),
            "other",
            Joining {
                name: Some("impostor".into()),
                ..Joining::default()
            },
            w.now
        ),
        Err(FederationError::AlreadyJoined(id.clone()))
    );
    let participants: Vec<_> = w.fed.participants().collect();
    assert_eq!(participants.len(), 1);
    assert_eq!(participants[0].name, None);
    assert_eq!(w.fed.heartbeat(&id, &secret, w.now), Ok(Action::Standby));
    assert_eq!(
        w.fed.heartbeat(&id, "other", w.now),
        Err(FederationError::InvalidSecret(id))
    );
}

#[test]
fn only_holders_of_the_join_secret_under_an_allowed_name_join() {
    let mut s = settings();
    s.join = JoinPolicy {
        secret_hash: Some(SecretHash::of("sesame-0123456789")),
        allowed_names: ["hospital-a".to_string()].into(),
        max_participants: None,
    };
    let mut w = World::new(s, Some(0));
    let joining = |name: &str, secret: Option<&str>| Joining {
        name: Some(name.into()),
        join_secret: secret.map(str::to_string),
        ..Joining::default()
    };
    let now = w.now;
    let fed = &mut w.fed;
    let mut try_join = |j: Joining| fed.join("x".into(), "their-secret", j, now);
    assert_eq!(
        try_join(joining("hospital-a", None)),
        Err(FederationError::MissingJoinSecret)
    );
    assert_eq!(
        try_join(joining("hospital-a", Some("sesame"))),
        Err(FederationError::InvalidJoinSecret)
    );
    assert_eq!(
        try_join(joining("hospital-b", Some("sesame-0123456789"))),
        Err(FederationError::NotAllowed(Some("hospital-b".into())))
    );
    assert_eq!(
        try_join(joining("hospital-a", Some("sesame-0123456789"))),
        Ok(())
    );
    assert_eq!(
        w.fed.heartbeat("x", "their-secret", w.now),
        Ok(Action::Standby)
    );
    // Only hashes are kept: neither secret appears in what a store would save.
    let saved = serde_json::to_string(&w.fed).unwrap();
    assert!(
        !saved.contains("sesame") && !saved.contains("their-secret"),
        "{saved}"
    );
}

#[test]
fn selection_and_tokens_come_from_the_callers_rng() {
    let run = |seed: u64| {
        let mut s = settings();
        s.participants_ratio = 0.5;
        let mut w = World::new(s, Some(0));
        w.rng = StdRng::seed_from_u64(seed);
        for _ in 0..10 {
            w.join();
        }
        w.open()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
    assert_eq!(run(1).len(), 5);
}

#[test]
fn status_lists_round_members_in_selection_order() {
    let mut s = settings();
    s.participants_ratio = 0.5;
    let mut w = World::new(s, Some(0));
    for _ in 0..20 {
        w.join();
    }
    w.open();
    let record = w.fed.history().next().unwrap().clone();
    let position = |id: &String| w.people.iter().position(|p| &p.0 == id);
    assert!(
        record
            .selected
            .windows(2)
            .all(|p| position(&p[0]) < position(&p[1]))
    );
}

#[test]
fn rejections_are_capped_per_round_and_repeats_count_once() {
    let mut s = settings();
    s.participants_ratio = 1.0;
    let mut w = World::new(s, Some(0));
    for _ in 0..20 {
        w.join();
    }
    w.open();
    let (r, a) = w.fed.current_round();
    for i in 0..20 {
        let id = w.id(i).to_string();
        for k in 0..MAX_REJECTIONS_PER_PARTICIPANT {
            w.fed
                .update_rejected(r, a, &id, format!("model_mismatch: {k}"));
            w.fed
                .update_rejected(r, a, &id, format!("model_mismatch: {k}"));
        }
    }
    let record = w.fed.history().next().unwrap().clone();
    assert_eq!(record.rejections.len(), MAX_REJECTIONS_PER_ROUND);
    // A repeat of a kept reason is the same rejection; one of a reason not kept is counted
    // again, as nothing is kept to compare it with.
    assert_eq!(
        record.rejections_dropped,
        2 * (20 * MAX_REJECTIONS_PER_PARTICIPANT - MAX_REJECTIONS_PER_ROUND)
    );
}

fn report(loss: f64, n_samples: u64, metrics: &[(&str, f64)]) -> EvaluationReport {
    EvaluationReport {
        participant_id: String::new(),
        loss,
        n_samples,
        metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    }
}

impl World {
    fn evaluate(
        &mut self,
        i: usize,
        round: u32,
        r: EvaluationReport,
    ) -> Result<EvaluationSummary, EvaluationError> {
        let (id, secret) = self.people[i].clone();
        self.fed
            .evaluation_reported(&id, &secret, r, round, self.now)
    }

    fn grant(&mut self, i: usize) -> TrainingGrant {
        let (id, secret) = self.people[i].clone();
        self.fed.start_training(&id, &secret, self.now).unwrap()
    }
}

#[test]
fn each_model_is_evaluated_by_the_asked_participants_and_the_mean_is_weighted() {
    let mut s = settings();
    s.evaluate_every = 1;
    let mut w = World::new(s, Some(0));
    w.join();
    w.join();
    w.open();
    // Round 1 trains from the model of round 0: both are asked to score it first.
    assert_eq!(w.grant(0).evaluate_round, Some(0));
    assert_eq!(w.grant(1).evaluate_round, Some(0));
    w.evaluate(0, 0, report(2.0, 10, &[("mae", 1.0)])).unwrap();
    let summary = w
        .evaluate(1, 0, report(5.0, 30, &[("mae", 3.0), ("r2", 0.5)]))
        .unwrap();
    assert_eq!(
        (summary.participants, summary.asked, summary.n_samples),
        (2, 2, 40)
    );
    assert!((summary.loss - (2.0 * 10.0 + 5.0 * 30.0) / 40.0).abs() < 1e-12);
    assert!((summary.metrics["mae"] - 2.5).abs() < 1e-12);
    assert_eq!(
        summary.metrics["r2"], 0.5,
        "a metric only one reported: its value"
    );
    assert_eq!(w.grant(0).evaluate_round, None, "reported: not asked again");
    assert!(matches!(
        w.evaluate(0, 0, report(1.0, 1, &[])),
        Err(EvaluationError::AlreadyReported(..))
    ));
    assert!(matches!(
        w.evaluate(0, 1, report(1.0, 1, &[])),
        Err(EvaluationError::NotAsked(..))
    ));
    for bad in [
        report(f64::NAN, 1, &[]),
        report(1.0, 0, &[]),
        report(1.0, 1, &[("x", f64::INFINITY)]),
    ] {
        assert!(matches!(
            w.evaluate(1, 0, bad),
            Err(EvaluationError::Invalid(_))
        ));
    }
    w.deliver(0, 10);
    w.deliver(1, 20);
    w.close(agreed(&w.fed));
    // Round 2 (the last) trains from round 1's model.
    w.open();
    assert_eq!(w.grant(1).evaluate_round, Some(1));
    w.evaluate(1, 1, report(1.5, 3, &[])).unwrap();
    w.deliver(0, 10);
    w.deliver(1, 20);
    w.close(agreed(&w.fed));
    assert_eq!(w.fed.phase_name(), PhaseName::Finished);
    // The final model: heartbeats ask for it until reported, then say finish.
    assert!(w.fed.evaluation_pending(w.now));
    assert_eq!(w.beat(0), Action::Evaluate { round: 2 });
    assert_eq!(
        w.beat(0),
        Action::Evaluate { round: 2 },
        "asked again until it reports"
    );
    w.evaluate(0, 2, report(0.5, 4, &[])).unwrap();
    assert_eq!(w.beat(0), Action::Finish);
    assert_eq!(w.beat(1), Action::Evaluate { round: 2 });
    // One that never reports is let go after round_timeout.
    w.advance(61);
    assert_eq!(w.beat(1), Action::Finish);
    assert!(!w.fed.evaluation_pending(w.now));

    let evaluated = |round: u32| {
        w.fed
            .history()
            .find(|r| r.round == round)
            .and_then(|r| r.evaluation.clone())
    };
    assert_eq!(evaluated(1).unwrap().loss, 1.5);
    assert_eq!(evaluated(2).unwrap().participants, 1);
    let lines = w.fed.round_summaries();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1].evaluation.as_ref().unwrap().loss, 0.5);
    assert_eq!(lines[1].total_samples, 30);
}

#[test]
fn only_a_share_of_those_able_to_evaluate_is_asked() {
    let mut s = settings();
    s.evaluate_every = 2;
    s.evaluate_fraction = 0.5;
    s.rounds = 3;
    s.min_clients = 5;
    let mut w = World::new(s, Some(0));
    for _ in 0..4 {
        w.join();
    }
    // One that cannot evaluate is never asked.
    let secret = token_from(&mut w.rng);
    w.fed
        .join("mute".into(), &secret, Joining::default(), w.now)
        .unwrap();
    w.people.push(("mute".into(), secret));
    w.open();
    let asked: Vec<usize> = (0..5)
        .filter(|&i| w.grant(i).evaluate_round == Some(0))
        .collect();
    assert_eq!(asked.len(), 2, "half of the 4 able, rounded up");
    assert!(!asked.contains(&4));
    for i in 0..5 {
        w.deliver(i, 1);
    }
    w.close(agreed(&w.fed));
    w.open();
    // The model of round 1 is not evaluated with evaluate_every = 2.
    assert!((0..5).all(|i| w.grant(i).evaluate_round.is_none()));
}

#[test]
fn an_open_round_logged_shows_no_token() {
    let open = OpenRound {
        round: 3,
        attempt: 1,
        grants: BTreeMap::from([("alice".to_string(), "secret-token-abc".to_string())]),
    };
    let shown = format!("{:?}", Command::OpenRound(open));
    assert!(
        shown.contains("alice") && shown.contains("round: 3"),
        "{shown}"
    );
    assert!(!shown.contains("secret-token-abc"), "{shown}");
}

impl World {
    fn join_named(&mut self, name: &str) -> usize {
        let id = format!("p{}", self.people.len());
        let secret = token_from(&mut self.rng);
        let joining = Joining {
            name: Some(name.into()),
            ..Joining::default()
        };
        self.fed
            .join(id.clone(), &secret, joining, self.now)
            .unwrap();
        self.people.push((id, secret));
        self.people.len() - 1
    }

    fn beat_all(&mut self) {
        for i in 0..self.people.len() {
            self.beat(i);
        }
    }

    /// Ticks until something changes the phase (or `limit` seconds passed), everyone
    /// heartbeating every second; returns the commands the ticks gave.
    fn run_until_phase_changes(&mut self, limit: u64) -> Vec<Command> {
        let phase = self.fed.phase_name();
        let mut commands = Vec::new();
        for _ in 0..limit {
            self.advance(1);
            self.beat_all();
            commands.extend(self.tick());
            if self.fed.phase_name() != phase {
                break;
            }
        }
        commands
    }
}

fn deadline_settings() -> FederationSettings {
    FederationSettings {
        min_clients: 10,
        heartbeat_timeout: Duration::from_secs(30),
        round_timeout: Duration::from_secs(60),
        training_timeout: Some(Duration::from_secs(10)),
        min_updates: 5,
        ..settings()
    }
}

#[test]
fn participants_past_the_training_deadline_are_not_waited_for_and_are_named() {
    let mut w = World::new(deadline_settings(), Some(0));
    for i in 0..10 {
        // Names for most; p8 goes by its id.
        if i == 8 {
            w.join();
        } else {
            w.join_named(&format!("site-{i}"));
        }
    }
    w.open();
    for i in 0..7 {
        w.deliver(i, 10 * (i as u64 + 1));
    }
    let commands = w.run_until_phase_changes(9);
    assert_eq!(commands, vec![], "the deadline has not passed");
    let commands = w.run_until_phase_changes(2);
    assert_eq!(
        commands,
        vec![Command::CloseRound {
            round: 1,
            attempt: 0
        }]
    );
    let (round, attempt) = w.fed.current_round();
    let result = agreed(&w.fed);
    w.fed.round_aggregated(round, attempt, result, w.now);
    let record = w.fed.history().next().unwrap().clone();
    assert_eq!(record.outcome, Some(Outcome::Aggregated));
    assert_eq!(record.close_reason, Some(CloseReason::TrainingDeadline));
    assert_eq!(
        record.missed_deadline,
        vec!["p7".to_string(), "p8".into(), "p9".into()]
    );
    assert_eq!(record.delivered.len(), 7);
    assert_eq!((record.target, record.quorum), (10, 5));
    assert_eq!(
        record.reason.as_deref(),
        Some("round 1: 7 of 10 updates; site-7, p8 and site-9 missed the training deadline (10 s)")
    );
    let line = w.fed.round_summaries().last().unwrap().clone();
    assert_eq!(line.close_reason, Some(CloseReason::TrainingDeadline));
    assert_eq!(line.missed_deadline, record.missed_deadline);
}

#[test]
fn the_training_deadline_counts_from_when_the_aggregator_opened_the_round() {
    let mut w = World::new(deadline_settings(), Some(0));
    for _ in 0..10 {
        w.join();
    }
    // The aggregator takes 8 s to acknowledge the opening.
    let Some(Command::OpenRound(open)) = w.tick().into_iter().next() else {
        panic!("expected OpenRound")
    };
    w.advance(8);
    w.beat_all();
    w.fed.round_opened(open.round, open.attempt, w.now);
    for i in 0..5 {
        w.deliver(i, 1);
    }
    assert_eq!(
        w.run_until_phase_changes(9),
        vec![],
        "10 s from the ack, not the opening"
    );
    assert_eq!(w.fed.phase_name(), PhaseName::Training);
    assert_eq!(w.run_until_phase_changes(2).len(), 1);
    assert_eq!(w.fed.phase_name(), PhaseName::Closing);
}

#[test]
fn an_update_that_comes_after_the_deadline_but_is_aggregated_counts_as_delivered() {
    let mut w = World::new(deadline_settings(), Some(0));
    for _ in 0..10 {
        w.join();
    }
    w.open();
    for i in 0..6 {
        w.deliver(i, 1);
    }
    w.run_until_phase_changes(11);
    assert_eq!(w.fed.phase_name(), PhaseName::Closing);
    // p6's update was being folded as the deadline passed: its notice comes while closing.
    w.deliver(6, 1);
    let (round, attempt) = w.fed.current_round();
    let result = agreed(&w.fed);
    w.fed.round_aggregated(round, attempt, result, w.now);
    let record = w.fed.history().next().unwrap().clone();
    assert_eq!(record.delivered.len(), 7);
    assert_eq!(
        record.missed_deadline,
        vec!["p7".to_string(), "p8".into(), "p9".into()]
    );
    assert!(!record.reason.unwrap().contains("p6"));
}

#[test]
fn a_round_that_can_no_longer_reach_its_quorum_fails_and_is_run_again() {
    let mut s = settings();
    s.min_clients = 3;
    s.min_updates = 3;
    s.rounds = 1;
    let mut w = World::new(s, Some(0));
    for _ in 0..3 {
        w.join();
    }
    w.open();
    w.deliver(0, 5);
    // p2 falls silent: dropped at the heartbeat timeout, 2 updates at most are left in reach.
    let mut commands = Vec::new();
    for _ in 0..6 {
        w.advance(1);
        w.beat(0);
        w.beat(1);
        commands.extend(w.tick());
    }
    assert_eq!(commands, vec![], "nothing is closed at the aggregator");
    assert_eq!(w.fed.phase_name(), PhaseName::WaitingForParticipants);
    assert_eq!(w.fed.current_round(), (1, 1));
    let failed = w.fed.history().next().unwrap().clone();
    assert_eq!(failed.outcome, Some(Outcome::Failed));
    assert_eq!(failed.close_reason, Some(CloseReason::QuorumUnreachable));
    assert_eq!(
        failed.reason.as_deref(),
        Some(
            "round 1 attempt 0 failed: 1 of 3 updates and 1 more expected, short of the quorum \
             of 3 (min_updates); p2 dropped (heartbeat timeout); the round is run again"
        )
    );
    // Two are left: too few to start; a third comes back (joining again) and the round runs.
    assert!(w.tick().is_empty());
    w.join();
    let grants = w.open();
    assert_eq!(grants.len(), 3);
    assert!(!grants.contains_key("p2"));
    for i in [0, 1, 3] {
        w.deliver(i, 5);
    }
    w.close(agreed(&w.fed));
    assert_eq!(w.fed.phase_name(), PhaseName::Finished);
    let done = w.fed.history().last().unwrap();
    assert_eq!((done.round, done.attempt), (1, 1));
    assert_eq!(done.close_reason, Some(CloseReason::AllDelivered));
    assert_eq!(
        done.reason.as_deref(),
        Some("round 1: 3 of 3 updates; every selected participant delivered")
    );
}

#[test]
fn over_selection_closes_at_the_target_and_the_rest_are_told_the_round_is_over() {
    let mut s = settings();
    s.participants_ratio = 0.5;
    s.selection_overcommit = 1.5;
    s.min_clients = 2;
    let mut w = World::new(s, Some(0));
    for _ in 0..10 {
        w.join();
    }
    let grants = w.open();
    assert_eq!(grants.len(), 8, "target ceil(0.5 × 10) = 5, × 1.5 → 8");
    let selected: Vec<usize> = (0..10).filter(|&i| grants.contains_key(w.id(i))).collect();
    for &i in &selected[..4] {
        w.deliver(i, 1);
    }
    assert!(w.tick().is_empty(), "4 of a target of 5");
    w.deliver(selected[4], 1);
    let (round, attempt) = w.fed.current_round();
    assert_eq!(w.tick(), vec![Command::CloseRound { round, attempt }]);
    for &i in &selected[5..] {
        assert_eq!(w.beat(i), Action::Standby, "the round is over for them");
        let (id, secret) = w.people[i].clone();
        assert_eq!(
            w.fed.start_training(&id, &secret, w.now),
            Err(FederationError::NotSelected(id))
        );
    }
    let result = agreed(&w.fed);
    w.fed.round_aggregated(round, attempt, result, w.now);
    let record = w.fed.history().next().unwrap().clone();
    assert_eq!(record.close_reason, Some(CloseReason::TargetReached));
    assert_eq!((record.selected.len(), record.target), (8, 5));
    let rest: Vec<&str> = selected[5..].iter().map(|&i| w.id(i)).collect();
    assert_eq!(
        record.reason.unwrap(),
        format!(
            "round 1: 5 of 8 updates; the target of 5 was reached, so {}, {} and {} were not \
             waited for",
            rest[0], rest[1], rest[2]
        )
    );
}

#[test]
fn over_selection_is_capped_by_the_available_and_round_zero_takes_one() {
    let mut s = settings();
    s.selection_overcommit = 1.5;
    s.min_clients = 4;
    let mut w = World::new(s, None);
    for _ in 0..4 {
        w.join();
    }
    assert_eq!(w.open().len(), 1, "round 0: one initial model");
    let chosen = w.fed.history().next().unwrap().selected[0].clone();
    let i = w.people.iter().position(|p| p.0 == chosen).unwrap();
    w.deliver(i, 1);
    w.close(agreed(&w.fed));
    assert_eq!(w.open().len(), 4, "target 4 × 1.5, but only 4 are there");
}

#[test]
fn the_default_deadline_is_round_timeout_and_names_who_had_not_delivered() {
    let mut w = World::new(settings(), Some(0));
    w.join_named("alice");
    w.join_named("bob");
    w.open();
    w.deliver(0, 3);
    let commands = w.run_until_phase_changes(61);
    assert_eq!(
        commands,
        vec![Command::CloseRound {
            round: 1,
            attempt: 0
        }]
    );
    let result = agreed(&w.fed);
    w.fed.round_aggregated(1, 0, result, w.now);
    let record = w.fed.history().next().unwrap().clone();
    assert_eq!(record.close_reason, Some(CloseReason::RoundTimeout));
    assert_eq!(record.missed_deadline, vec!["p1".to_string()]);
    assert_eq!(
        record.reason.as_deref(),
        Some("round 1: 1 of 2 updates; bob had not delivered at round_timeout (60 s)")
    );
}

#[test]
fn a_federation_saved_before_deadlines_and_quorums_reads_back_and_carries_on() {
    let mut w = World::new(settings(), Some(0));
    w.join();
    w.join();
    w.open();
    w.deliver(0, 4);
    let mut saved = serde_json::to_value(&w.fed).unwrap();
    // What a snapshot written by the previous version lacks.
    let settings = saved["settings"].as_object_mut().unwrap();
    for key in ["training_timeout", "min_updates", "selection_overcommit"] {
        assert!(settings.remove(key).is_some(), "{key}");
    }
    let active = saved["phase"]["Training"].as_object_mut().unwrap();
    for key in ["training_since", "closing_for", "missed"] {
        assert!(active.remove(key).is_some(), "{key}");
    }
    let record = active["record"].as_object_mut().unwrap();
    for key in ["missed_deadline", "target", "quorum", "close_reason"] {
        assert!(record.remove(key).is_some(), "{key}");
    }
    let old: Federation = serde_json::from_value(saved).expect("an old snapshot reads back");
    assert_eq!(old.settings().min_updates, 1);
    assert_eq!(old.settings().selection_overcommit, 1.0);
    w.fed = old;
    w.deliver(1, 6);
    w.close(agreed(&w.fed));
    let record = w.fed.history().next().unwrap().clone();
    assert_eq!(record.close_reason, Some(CloseReason::AllDelivered));
    assert_eq!(record.delivered.len(), 2);
    assert_eq!(w.fed.current_round(), (2, 0));
}

#[test]
fn dropped_participants_are_forgotten_beyond_the_cap_and_after_a_long_silence() {
    let mut s = settings();
    s.min_clients = 100; // no round opens: only the registry matters here
    s.join.max_participants = Some(3);
    let mut w = World::new(s, Some(0));
    // Six join and fall silent, in two waves: the registry never keeps more than three of
    // them once dropped, and forgets the oldest first.
    for _ in 0..3 {
        w.join();
    }
    w.advance(6);
    w.tick();
    for _ in 0..3 {
        w.join();
    }
    w.advance(6);
    w.tick();
    let kept = |w: &World| -> Vec<ParticipantId> {
        w.fed
            .participants()
            .map(|p| p.participant_id.clone())
            .collect()
    };
    assert_eq!(kept(&w), ["p3", "p4", "p5"]);
    let (id, secret) = w.people[0].clone();
    assert_eq!(
        w.fed.heartbeat(&id, &secret, w.now),
        Err(FederationError::UnknownParticipant(id))
    );
    assert!(matches!(w.beat(3), Action::Rejected { .. }));
    // A live one is never forgotten; the dropped ones go after 60 timeouts of silence.
    let live = w.join();
    for _ in 0..60 {
        w.advance(5);
        w.beat(live);
        w.tick();
    }
    w.advance(1);
    w.tick();
    assert_eq!(kept(&w), ["p6"]);
}

#[test]
fn evaluations_at_the_edge_of_f64_have_finite_means_and_the_federation_still_reads_back() {
    let mut s = settings();
    s.evaluate_every = 1;
    let mut w = World::new(s, Some(0));
    w.join();
    w.join();
    w.open();
    w.evaluate(0, 0, report(1.0, 1, &[])).unwrap();
    w.evaluate(1, 0, report(1.0, 1, &[])).unwrap();
    w.deliver(0, 10);
    w.deliver(1, 20);
    w.close(agreed(&w.fed));
    w.open();
    assert_eq!(w.grant(1).evaluate_round, Some(1));
    // Finite, as the report's check wants, but 10 × f64::MAX is not.
    let summary = w
        .evaluate(1, 1, report(f64::MAX, 10, &[("mae", -f64::MAX)]))
        .unwrap();
    assert_eq!(summary.loss, f64::MAX);
    assert_eq!(summary.metrics["mae"], -f64::MAX);
    let saved = serde_json::to_string(&w.fed).unwrap();
    let read_back: Federation =
        serde_json::from_str(&saved).expect("the saved federation reads back");
    assert_eq!(read_back, w.fed);
}

#[test]
fn a_large_federations_history_keeps_fewer_rounds_within_its_entry_budget() {
    let w = everyone_delivers(3_000, 12, |_, _| {});
    let history = records(&w.fed);
    // Each record: 3,000 selected, delivered and deliveries of two metrics each.
    assert_eq!(history[0].entries(), 3_000 * 5);
    let entries: usize = history.iter().map(RoundRecord::entries).sum();
    assert!(entries <= HISTORY_ENTRIES, "{entries}");
    assert_eq!(history.len(), HISTORY_ENTRIES / (3_000 * 5));
    assert_eq!(history.last().unwrap().round, 12);
    assert_eq!(w.fed.history_forgotten() + history.len() as u64, 12);
    // Every attempt still has its line.
    assert_eq!(w.fed.round_summaries().len(), 12);
}

#[test]
fn a_round_larger_than_the_entry_budget_is_still_kept_as_the_last_record() {
    let mut record = failed_record(HISTORY_ENTRIES + 1);
    let mut fed = Federation::new(settings());
    record.round = 1;
    fed.push_history(record.clone());
    record.round = 2;
    fed.push_history(record);
    let kept: Vec<u32> = fed.history().map(|r| r.round).collect();
    assert_eq!(kept, [2]);
    assert_eq!(fed.history_forgotten(), 1);
}

/// A closed record naming `selected` participants, none of whom delivered.
fn failed_record(selected: usize) -> RoundRecord {
    let ids = (0..selected).map(|i| format!("p{i}")).collect();
    RoundRecord {
        outcome: Some(Outcome::Failed),
        close_reason: Some(CloseReason::QuorumTimeout),
        duration_secs: Some(1.0),
        ..RoundRecord::opening(1, 0, ids, selected, 1)
    }
}

/// A world of `participants`, every one of whom delivers with two metrics in each of `rounds`
/// rounds; `after_round` sees it once each round has closed.
fn everyone_delivers(
    participants: usize,
    rounds: u32,
    mut after_round: impl FnMut(u32, &World),
) -> World {
    let mut s = settings();
    s.rounds = rounds;
    s.min_clients = participants;
    let mut w = World::new(s, Some(0));
    for _ in 0..participants {
        w.join();
    }
    let metrics: BTreeMap<String, f64> =
        [("loss".to_string(), 0.5), ("accuracy".to_string(), 0.9)].into();
    for round in 1..=rounds {
        w.open();
        let (r, a) = w.fed.current_round();
        for i in 0..participants {
            let id = w.id(i).to_string();
            w.fed.update_accepted(r, a, &id, 10, metrics.clone());
        }
        w.close(agreed(&w.fed));
        after_round(round, &w);
    }
    w
}

#[test]
fn a_summary_lists_the_first_missed_participants_and_counts_the_rest() {
    let mut record = failed_record(SUMMARY_MISSED_LISTED + 20);
    record.missed_deadline = record.selected.clone();
    let summary = RoundSummary::of(&record);
    assert_eq!(
        summary.missed_deadline,
        record.selected[..SUMMARY_MISSED_LISTED]
    );
    assert_eq!(summary.missed_deadline_unlisted, 20);
}

#[test]
fn a_summary_keeps_the_metric_names_most_deliveries_share() {
    let mut record = failed_record(100);
    // Everyone reports `loss`; each also names one metric of its own.
    record.deliveries = (0..100)
        .map(|i| Delivery {
            participant_id: format!("p{i}"),
            n_samples: 1,
            metrics: [("loss".to_string(), 1.0), (format!("own{i:03}"), 2.0)].into(),
            metrics_dropped: 0,
        })
        .collect();
    let summary = RoundSummary::of(&record);
    assert_eq!(summary.training_metrics.len(), MAX_METRICS_PER_DELIVERY);
    assert_eq!(summary.training_metrics.get("loss"), Some(&1.0));
    // The rest by name: own000 to own030.
    assert!(summary.training_metrics.contains_key("own030"));
    assert!(!summary.training_metrics.contains_key("own031"));
}

/// The measurement behind `HISTORY_ENTRIES` (docs/benchmarks.md): 10,000 participants
/// delivering with two metrics for 120 rounds, the federation's saved size and the time to
/// serialize it printed every 20 rounds. Run with `--release -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement: about 30 s in release"]
fn history_size_at_ten_thousand_participants() {
    let w = everyone_delivers(10_000, 120, |round, w| {
        if round % 20 == 0 {
            let started = std::time::Instant::now();
            let saved = serde_json::to_vec(&w.fed).unwrap().len();
            let took = started.elapsed();
            let history = serde_json::to_vec(&records(&w.fed)).unwrap().len();
            eprintln!(
                "round {round}: federation {:.1} MB serialized in {took:.0?}; history {:.1} MB \
                 in {} records",
                saved as f64 / 1e6,
                history as f64 / 1e6,
                w.fed.history().count(),
            );
        }
    });
    let saved = serde_json::to_vec(&w.fed).unwrap().len();
    assert!(saved < 10_000_000, "{saved}");
}
