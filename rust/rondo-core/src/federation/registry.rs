//! Participants: joining, proving who they are, and heartbeating.

use serde::{Deserialize, Serialize};

use super::machine::Phase;
use super::{
    Action, Federation, FederationError, Joining, ParticipantId, SecretHash, Timestamp,
    TrainingGrant,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Participant {
    pub(super) name: Option<String>,
    /// Only its hash: a secret is checked, never shown again.
    pub(super) secret: SecretHash,
    pub(super) last_seen: Timestamp,
    pub(super) dropped: bool,
    /// Said at join: it can score a model on its data (federated evaluation).
    pub(super) can_evaluate: bool,
}

/// A dropped participant is forgotten after this many heartbeat timeouts of silence.
pub const FORGET_AFTER_TIMEOUTS: u32 = 60;
/// At most this many dropped participants are kept, whatever the cap on live ones.
pub const MAX_DROPPED_KEPT: usize = 100_000;

impl Federation {
    /// Registers a participant under `id` with `secret`, both made by the caller (the
    /// coordinator draws them from the OS's random source), if the federation's
    /// [`JoinPolicy`] lets it in. An `id` already taken, a missing or wrong join secret and a
    /// name not allowed are refused and change nothing.
    pub fn join(
        &mut self,
        id: ParticipantId,
        secret: &str,
        joining: Joining,
        now: Timestamp,
    ) -> Result<(), FederationError> {
        let policy = &self.settings.join;
        if let Some(hash) = &policy.secret_hash {
            match &joining.join_secret {
                None => return Err(FederationError::MissingJoinSecret),
                Some(given) if !hash.matches(given) => {
                    return Err(FederationError::InvalidJoinSecret);
                }
                Some(_) => {}
            }
        }
        if !policy.allowed_names.is_empty()
            && !joining
                .name
                .as_ref()
                .is_some_and(|n| policy.allowed_names.contains(n))
        {
            return Err(FederationError::NotAllowed(joining.name));
        }
        if self.participants.contains_key(&id) {
            return Err(FederationError::AlreadyJoined(id));
        }
        if let Some(max) = policy.max_participants
            && self.participants.values().filter(|p| !p.dropped).count() >= max
        {
            return Err(FederationError::Full(max));
        }
        let Joining {
            name, can_evaluate, ..
        } = joining;
        self.participants.insert(
            id.clone(),
            Participant {
                name,
                secret: SecretHash::of(secret),
                last_seen: now,
                dropped: false,
                can_evaluate,
            },
        );
        self.join_order.push(id);
        Ok(())
    }

    pub(super) fn authenticate(
        &mut self,
        id: &str,
        secret: &str,
    ) -> Result<&mut Participant, FederationError> {
        let participant = self
            .participants
            .get_mut(id)
            .ok_or_else(|| FederationError::UnknownParticipant(id.to_string()))?;
        if !participant.secret.matches(secret) {
            return Err(FederationError::InvalidSecret(id.to_string()));
        }
        Ok(participant)
    }

    /// [`Self::authenticate`], for a participant that is still a member: a dropped one's
    /// credential has expired (it must join again, under a new id).
    pub(super) fn authenticate_member(
        &mut self,
        id: &str,
        secret: &str,
    ) -> Result<&mut Participant, FederationError> {
        let participant = self.authenticate(id, secret)?;
        if participant.dropped {
            return Err(FederationError::CredentialExpired(id.to_string()));
        }
        Ok(participant)
    }

    pub fn heartbeat(
        &mut self,
        id: &str,
        secret: &str,
        now: Timestamp,
    ) -> Result<Action, FederationError> {
        let participant = self.authenticate(id, secret)?;
        if participant.dropped {
            return Ok(Action::Rejected {
                reason: "dropped: no heartbeat within heartbeat_timeout; join again".into(),
            });
        }
        participant.last_seen = now;
        Ok(match &self.phase {
            Phase::Finished => self.finished_action(id, now),
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
        now: Timestamp,
    ) -> Result<TrainingGrant, FederationError> {
        let participant = self.authenticate_member(id, secret)?;
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
        active.mark_started(id);
        Ok(TrainingGrant {
            round,
            attempt,
            token,
            has_global_model: round > 0,
            evaluate_round: self.evaluation_due(id, round),
        })
    }

    /// Marks participants silent for longer than `heartbeat_timeout` as dropped; returns them.
    pub(super) fn drop_silent(&mut self, now: Timestamp) -> Vec<ParticipantId> {
        let timeout = self.settings.heartbeat_timeout;
        let mut newly_dropped = Vec::new();
        // Every tick comes here (and the driver ticks after every join): one pass over the
        // map's memory says whether anyone is silent, where the pass in join order below
        // costs a lookup per participant (2 ms at 10,000, under the federation's lock).
        if !self
            .participants
            .values()
            .any(|p| !p.dropped && now.since(p.last_seen) > timeout)
        {
            return newly_dropped;
        }
        // In join order, so that a round's `dropped` list comes out the same every time.
        for id in &self.join_order {
            if let Some(participant) = self.participants.get_mut(id)
                && !participant.dropped
                && now.since(participant.last_seen) > timeout
            {
                participant.dropped = true;
                newly_dropped.push(id.clone());
            }
        }
        newly_dropped
    }

    /// Forgets dropped participants that no open round lists, once they have been silent for
    /// [`FORGET_AFTER_TIMEOUTS`] heartbeat timeouts, or sooner, oldest first, while more are
    /// kept than the cap on participants (or [`MAX_DROPPED_KEPT`] without one): a flood of
    /// joins that never heartbeat must not grow the registry for good. A forgotten participant's
    /// credential is unknown (`UnknownParticipant`); it joins again, as a dropped one would.
    pub(super) fn forget_long_dropped(&mut self, now: Timestamp) {
        let forget_after = self.settings.heartbeat_timeout * FORGET_AFTER_TIMEOUTS;
        let keep = self
            .settings
            .join
            .max_participants
            .unwrap_or(MAX_DROPPED_KEPT)
            .min(MAX_DROPPED_KEPT);
        // One pass over the map's memory says whether there is anything to forget (every tick
        // comes here); the pass in join order below costs a lookup per participant.
        let (mut dropped, mut any_stale) = (0, false);
        for p in self.participants.values().filter(|p| p.dropped) {
            dropped += 1;
            any_stale |= now.since(p.last_seen) > forget_after;
        }
        if dropped <= keep && !any_stale {
            return;
        }
        let mut excess = dropped.saturating_sub(keep);
        let active = self.active();
        let forgotten: std::collections::HashSet<ParticipantId> = self
            .join_order
            .iter()
            .filter(|id| {
                let Some(p) = self.participants.get(*id) else {
                    return false;
                };
                if !p.dropped || active.is_some_and(|a| a.is_selected(id)) {
                    return false;
                }
                if excess > 0 {
                    excess -= 1;
                    return true;
                }
                now.since(p.last_seen) > forget_after
            })
            .cloned()
            .collect();
        if forgotten.is_empty() {
            return;
        }
        self.join_order.retain(|id| !forgotten.contains(id));
        self.participants.retain(|id, _| !forgotten.contains(id));
    }

    /// Participants that may be selected, in join order.
    pub(super) fn available(&self) -> impl Iterator<Item = &ParticipantId> {
        self.join_order
            .iter()
            .filter(|id| self.participants.get(*id).is_some_and(|p| !p.dropped))
    }
}
