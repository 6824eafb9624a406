//! The federation as the status endpoint shows it (`docs/openapi/coordinator.json`,
//! `CoordinatorStatus`), and the counts the metrics gauges read.
//!
//! Built on request from what `rondo_core::federation` shows of itself (its phase, a
//! `ParticipantView` per participant, the round records): the state machine keeps no view.

use std::collections::BTreeMap;

use rondo_core::federation::{Federation, ParticipantId, ParticipantState, RoundRecord, Timestamp};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ParticipantStatus {
    pub participant_id: ParticipantId,
    pub name: Option<String>,
    /// A [`ParticipantState`] by name (`available`, `selected`, `training`, `delivered`,
    /// `dropped`).
    pub state: &'static str,
    pub can_evaluate: bool,
    pub last_heartbeat_secs_ago: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FederationStatus {
    /// A `PhaseName` by name (`waiting_for_aggregator`, ..., `finished`).
    pub phase: &'static str,
    pub round: u32,
    pub attempt: u32,
    pub rounds: u32,
    pub participants: Vec<ParticipantStatus>,
    pub counts: BTreeMap<&'static str, usize>,
    /// The last `HISTORY_ROUNDS` closed round records, oldest first, then the running one.
    pub history: Vec<RoundRecord>,
    /// Closed records older than those in `history`, no longer kept.
    pub history_forgotten: u64,
}

impl FederationStatus {
    pub fn of(federation: &Federation, now: Timestamp) -> Self {
        let participants: Vec<ParticipantStatus> = federation
            .participants()
            .map(|p| ParticipantStatus {
                participant_id: p.participant_id.clone(),
                name: p.name.map(str::to_owned),
                state: p.state.as_str(),
                can_evaluate: p.can_evaluate,
                last_heartbeat_secs_ago: now.since(p.last_seen).as_secs_f64(),
            })
            .collect();
        let (round, attempt) = federation.current_round();
        FederationStatus {
            phase: federation.phase_name().as_str(),
            round,
            attempt,
            rounds: federation.settings().rounds,
            // States nobody is in are left out.
            counts: counts_by_state(federation)
                .into_iter()
                .filter(|&(_, n)| n > 0)
                .map(|(state, n)| (state.as_str(), n))
                .collect(),
            participants,
            history: federation.history().cloned().collect(),
            history_forgotten: federation.history_forgotten(),
        }
    }
}

/// How many participants are in each state, every state listed (the metrics' gauges).
pub fn counts_by_state(federation: &Federation) -> [(ParticipantState, usize); 5] {
    let mut counts = ParticipantState::ALL.map(|state| (state, 0));
    for p in federation.participants() {
        if let Some(slot) = counts.iter_mut().find(|(state, _)| *state == p.state) {
            slot.1 += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use rondo_core::federation::Joining;
    use serde_json::json;

    use super::*;

    #[test]
    fn the_view_names_phases_and_states_and_counts_only_states_someone_is_in() {
        // The embedded defaults, with three participants to wait for and five seconds of silence
        // before a participant is dropped.
        let settings = rondo_net::boot::load_settings_with::<crate::config::CoordinatorSettings>(
            crate::config::DEFAULTS,
            "[federation]\nrounds = 2\nmin_clients = 3\nheartbeat_timeout_secs = 5.0\n",
        )
        .expect("valid");
        let mut federation = Federation::new(settings.federation);
        let at = Timestamp::from_millis;
        federation.aggregator_attached(Some(0), at(0));
        for (id, millis) in [("p0", 0), ("p1", 4_000)] {
            let joining = Joining {
                name: Some(format!("site {id}")),
                ..Joining::default()
            };
            federation
                .join(id.into(), "secret", joining, at(millis))
                .expect("joins");
        }
        // p0 has been silent for longer than the heartbeat timeout.
        federation.tick(at(6_000), &mut StdRng::seed_from_u64(0));

        let status = FederationStatus::of(&federation, at(6_000));
        let value = serde_json::to_value(&status).expect("serializes");
        assert_eq!(value["phase"], "waiting_for_participants");
        assert_eq!(
            (value["round"].clone(), value["rounds"].clone()),
            (json!(1), json!(2))
        );
        assert_eq!(value["counts"], json!({"available": 1, "dropped": 1}));
        assert_eq!(
            value["participants"],
            json!([
                {"participant_id": "p0", "name": "site p0", "state": "dropped",
                 "can_evaluate": false, "last_heartbeat_secs_ago": 6.0},
                {"participant_id": "p1", "name": "site p1", "state": "available",
                 "can_evaluate": false, "last_heartbeat_secs_ago": 2.0},
            ])
        );
        assert_eq!(value["history"], json!([]));
        assert_eq!(value["history_forgotten"], 0);
        // The gauges see every state, the empty ones at 0.
        let by_state = counts_by_state(&federation).map(|(state, n)| (state.as_str(), n));
        assert_eq!(
            by_state,
            [
                ("available", 1),
                ("selected", 0),
                ("training", 0),
                ("delivered", 0),
                ("dropped", 1)
            ]
        );
    }
}
