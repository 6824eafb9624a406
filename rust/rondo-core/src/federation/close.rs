//! When a round closes, and what its record says about why.
//!
//! Each tick of a training round asks [`verdict`]. Three numbers decide, all per attempt: the
//! round's **target** (the updates it closes at, what the selection would be without
//! over-selection), the **quorum** (`min_updates`, capped by the target: the updates it needs
//! to aggregate at all), and the updates **delivered** so far. A selected participant is
//! *expected* until it delivers, is dropped (heartbeat timeout) or its deadline passes: the
//! training deadline (`training_timeout`, from when training opened) or `round_timeout` (from
//! the opening), whichever comes first; from then on it has *missed* it.
//!
//! - `target` updates delivered: close (`all_delivered` when that is everyone selected,
//!   `target_reached` when over-selected participants were still training);
//! - too few still expected for the quorum: fail (`quorum_unreachable`, or `quorum_timeout`
//!   when `round_timeout` is what made them too few);
//! - no one expected any more: close with what arrived (`training_deadline`, `round_timeout`,
//!   or `participants_dropped` when drops alone settled it).
//!
//! A closing round is aggregated by the aggregator, which may still fail it
//! (`aggregation_failed`); a failed attempt is run again with the same round number.

use super::machine::ActiveRound;
use super::{CloseReason, Federation, FederationSettings, ParticipantId, Timestamp};

/// What a tick makes of a training round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Ask the aggregator to aggregate what it has.
    Close(CloseReason),
    /// Give the attempt up; the round is run again.
    Fail(CloseReason),
}

/// Whether the training round `active` closes or fails at `now`, and why; `None`: it waits.
/// Participants whose deadline passed are marked as having missed it.
pub(super) fn verdict(
    active: &mut ActiveRound,
    now: Timestamp,
    settings: &FederationSettings,
) -> Option<Verdict> {
    let round_over = now.since(active.opened_at) >= settings.round_timeout;
    let training_since = active.training_since.unwrap_or(active.opened_at);
    let training_over = now.since(training_since) >= settings.training_timeout();
    if round_over || training_over {
        active.miss_outstanding();
    }
    let delivered = active.delivered.len();
    if delivered >= active.tokens.len() {
        return Some(Verdict::Close(CloseReason::AllDelivered));
    }
    if delivered >= active.target() {
        return Some(Verdict::Close(CloseReason::TargetReached));
    }
    let expected = active.expected();
    if delivered + expected < active.quorum() {
        return Some(Verdict::Fail(if round_over {
            CloseReason::QuorumTimeout
        } else {
            CloseReason::QuorumUnreachable
        }));
    }
    if expected > 0 {
        return None;
    }
    Some(Verdict::Close(if round_over {
        CloseReason::RoundTimeout
    } else if !active.missed.is_empty() {
        CloseReason::TrainingDeadline
    } else {
        CloseReason::ParticipantsDropped
    }))
}

impl ActiveRound {
    /// Why a round that is closing closed, from its state alone: for a round saved while
    /// closing before the reason was kept.
    pub(super) fn settled_reason(&self) -> CloseReason {
        let delivered = self.delivered.len();
        if delivered >= self.tokens.len() {
            CloseReason::AllDelivered
        } else if delivered >= self.target() {
            CloseReason::TargetReached
        } else if !self.missed.is_empty() {
            CloseReason::TrainingDeadline
        } else if !self.dropped.is_empty() {
            CloseReason::ParticipantsDropped
        } else {
            CloseReason::RoundTimeout
        }
    }
}

/// At most this many participants are named in a sentence; the record's lists have them all.
const NAMED: usize = 10;

impl Federation {
    /// The record's sentence for `active` closed (or failed) for `reason`: what arrived, who
    /// was not waited for and why, participants by name where they have one.
    pub(super) fn describe(&self, active: &ActiveRound, reason: CloseReason) -> String {
        let record = &active.record;
        let (round, attempt) = (record.round, record.attempt);
        let counts = format!(
            "{} of {} updates",
            record.delivered.len(),
            record.selected.len()
        );
        let mut parts = match reason {
            CloseReason::QuorumUnreachable | CloseReason::QuorumTimeout => {
                let expected = active.expected();
                let more = if expected > 0 {
                    format!(" and {expected} more expected")
                } else {
                    String::new()
                };
                vec![format!(
                    "round {round} attempt {attempt} failed: {counts}{more}, short of the quorum \
                     of {} (min_updates)",
                    active.quorum()
                )]
            }
            _ => vec![format!("round {round}: {counts}")],
        };
        match reason {
            CloseReason::AllDelivered => {
                parts.push("every selected participant delivered".into());
            }
            CloseReason::TargetReached => {
                let not_waited: Vec<ParticipantId> = record
                    .selected
                    .iter()
                    .filter(|id| active.expects(id))
                    .cloned()
                    .collect();
                let mut text = format!("the target of {} was reached", active.target());
                if !not_waited.is_empty() {
                    text.push_str(&format!(
                        ", so {} {} not waited for",
                        self.names(&not_waited),
                        if not_waited.len() == 1 { "was" } else { "were" }
                    ));
                }
                parts.push(text);
            }
            _ => {}
        }
        let timed_out = matches!(
            reason,
            CloseReason::RoundTimeout | CloseReason::QuorumTimeout
        );
        if !record.missed_deadline.is_empty() {
            parts.push(if timed_out {
                format!(
                    "{} had not delivered at round_timeout ({})",
                    self.names(&record.missed_deadline),
                    secs(self.settings.round_timeout)
                )
            } else {
                format!(
                    "{} missed the training deadline ({})",
                    self.names(&record.missed_deadline),
                    secs(self.settings.training_timeout())
                )
            });
        } else if reason == CloseReason::RoundTimeout {
            parts.push(format!(
                "round_timeout ({}) reached",
                secs(self.settings.round_timeout)
            ));
        } else if reason == CloseReason::TrainingDeadline {
            parts.push(format!(
                "the training deadline ({}) passed",
                secs(self.settings.training_timeout())
            ));
        }
        if !record.dropped.is_empty() {
            parts.push(format!(
                "{} dropped (heartbeat timeout)",
                self.names(&record.dropped)
            ));
        }
        if matches!(
            reason,
            CloseReason::QuorumUnreachable | CloseReason::QuorumTimeout
        ) {
            parts.push("the round is run again".into());
        }
        parts.join("; ")
    }

    /// The sentence of a round that closed for `closed_for` and that the aggregator then could
    /// not aggregate, for `why`.
    pub(super) fn describe_aggregation_failure(
        &self,
        active: &ActiveRound,
        closed_for: CloseReason,
        why: &str,
    ) -> String {
        let closed = self.describe(active, closed_for);
        let (round, attempt) = (active.record.round, active.record.attempt);
        let after = closed
            .strip_prefix(&format!("round {round}: "))
            .unwrap_or(&closed);
        format!(
            "round {round} attempt {attempt} failed: the aggregator could not make a model: \
             {why}; it had closed with {after}; the round is run again"
        )
    }

    /// `ids` by name (or id, for one without a name), at most [`NAMED`] of them.
    fn names(&self, ids: &[ParticipantId]) -> String {
        let mut shown: Vec<String> = ids
            .iter()
            .take(NAMED)
            .map(|id| {
                self.participants
                    .get(id)
                    .and_then(|p| p.name.clone())
                    .unwrap_or_else(|| id.clone())
            })
            .collect();
        if ids.len() > NAMED {
            shown.push(format!("{} more", ids.len() - NAMED));
        }
        match shown.as_slice() {
            [] => String::new(),
            [one] => one.clone(),
            [init @ .., last] => format!("{} and {last}", init.join(", ")),
        }
    }
}

/// A duration as the config gives it: "30 s", "0.5 s".
fn secs(d: std::time::Duration) -> String {
    format!("{} s", d.as_secs_f64())
}
