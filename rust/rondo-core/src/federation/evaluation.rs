//! Federated evaluation: participants score a global model on their own data, and the
//! federation keeps the sample-weighted mean of what they report.
//!
//! With `evaluate_every = k` (0: never), the model of every round `m` with `m % k == 0`, and
//! always the final one, is evaluated. A share `evaluate_fraction` (rounded up, at least one)
//! of the participants that said at join that they can evaluate is asked:
//!
//! - for the model a training round starts from (round `m` for training round `m + 1`), among
//!   the participants selected for that round: their training grant says so, and they score
//!   the model they downloaded to train from before training, so it costs no download;
//! - for the final model, among every participant still alive once the last round closed:
//!   their heartbeats answer [`Action::Evaluate`] until they report or `round_timeout` passes,
//!   then [`Action::Finish`]. They are chosen as the last round closes, so that none hears
//!   "finish" first.
//!
//! A participant reports once per model, and only when asked. The round's history record (and
//! its [`RoundSummary`]) carries the [`EvaluationSummary`] as reports come in.

use std::collections::{BTreeMap, BTreeSet};

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::machine::Phase;
use super::selection::choose;
use super::{
    Action, CloseReason, Federation, FederationError, MAX_METRIC_NAME_BYTES,
    MAX_METRICS_PER_DELIVERY, Outcome, ParticipantId, RoundRecord, Timestamp,
};

/// One participant's score of a global model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationReport {
    pub participant_id: ParticipantId,
    pub loss: f64,
    pub n_samples: u64,
    pub metrics: BTreeMap<String, f64>,
}

/// What the participants who evaluated a model reported, weighted by their sample counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationSummary {
    /// How many reported, and how many were asked.
    pub participants: usize,
    pub asked: usize,
    pub n_samples: u64,
    /// Σ nᵢ·lossᵢ / Σ nᵢ.
    pub loss: f64,
    /// Each metric's sample-weighted mean over the reports that carry it.
    pub metrics: BTreeMap<String, f64>,
}

/// A model being evaluated: who was asked, what came back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Evaluation {
    asked: BTreeSet<ParticipantId>,
    reports: Vec<EvaluationReport>,
    /// For the final model: when participants stop being asked.
    until: Option<Timestamp>,
}

/// Why an evaluation report is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvaluationError {
    #[error(transparent)]
    Federation(#[from] FederationError),
    #[error("participant `{0}` was not asked to evaluate the model of round {1}")]
    NotAsked(ParticipantId, u32),
    #[error("participant `{0}` already reported its evaluation of the model of round {1}")]
    AlreadyReported(ParticipantId, u32),
    #[error("{0}")]
    Invalid(String),
}

/// How many of the participants that missed a round's deadline its summary lists by id.
pub const SUMMARY_MISSED_LISTED: usize = 100;

/// A round's outcome in one line per attempt, for every attempt ever closed: what the history
/// download gives (the status keeps only the last rounds' full records).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    pub round: u32,
    pub attempt: u32,
    pub outcome: Option<Outcome>,
    /// Why it closed, as a code (see [`CloseReason`]).
    #[serde(default)]
    pub close_reason: Option<CloseReason>,
    pub reason: Option<String>,
    pub duration_secs: Option<f64>,
    pub selected: usize,
    pub delivered: usize,
    /// Who missed the training deadline (or `round_timeout`) and is not in the model: the
    /// first [`SUMMARY_MISSED_LISTED`] of them, in selection order.
    #[serde(default)]
    pub missed_deadline: Vec<ParticipantId>,
    /// How many more missed it than `missed_deadline` lists.
    #[serde(default)]
    pub missed_deadline_unlisted: usize,
    pub total_samples: u64,
    /// Each training metric's sample-weighted mean over the deliveries that carry it.
    pub training_metrics: BTreeMap<String, f64>,
    /// The evaluation of the model this attempt produced, once participants have reported.
    pub evaluation: Option<EvaluationSummary>,
}

impl RoundSummary {
    pub(super) fn of(record: &RoundRecord) -> Self {
        let weighted = record.deliveries.iter().map(|d| (d.n_samples, &d.metrics));
        Self {
            round: record.round,
            attempt: record.attempt,
            outcome: record.outcome,
            close_reason: record.close_reason,
            reason: record.reason.clone(),
            duration_secs: record.duration_secs,
            selected: record.selected.len(),
            delivered: record.delivered.len(),
            missed_deadline: record
                .missed_deadline
                .iter()
                .take(SUMMARY_MISSED_LISTED)
                .cloned()
                .collect(),
            missed_deadline_unlisted: record
                .missed_deadline
                .len()
                .saturating_sub(SUMMARY_MISSED_LISTED),
            total_samples: record
                .deliveries
                .iter()
                .fold(0u64, |sum, d| sum.saturating_add(d.n_samples)),
            training_metrics: weighted_means(weighted),
            evaluation: record.evaluation.clone(),
        }
    }
}

/// Each name's mean over the maps that have it, weighted by their counts; of the
/// [`MAX_METRICS_PER_DELIVERY`] names the most maps have (ties by name), so that participants
/// naming their metrics each their own way cannot make one line of the history grow with them.
fn weighted_means<'a>(
    weighted: impl Iterator<Item = (u64, &'a BTreeMap<String, f64>)>,
) -> BTreeMap<String, f64> {
    let mut by_name: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for (n, metrics) in weighted {
        for (name, value) in metrics {
            by_name.entry(name).or_default().push((n as f64, *value));
        }
    }
    if by_name.len() > MAX_METRICS_PER_DELIVERY {
        let mut names: Vec<(&str, usize)> = by_name
            .iter()
            .map(|(name, pairs)| (*name, pairs.len()))
            .collect();
        names.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let kept: BTreeSet<&str> = names
            .into_iter()
            .take(MAX_METRICS_PER_DELIVERY)
            .map(|(name, _)| name)
            .collect();
        by_name.retain(|name, _| kept.contains(name));
    }
    by_name
        .into_iter()
        .filter_map(|(name, pairs)| Some((name.to_string(), weighted_mean(&pairs)?)))
        .collect()
}

/// `Σ nᵢ · xᵢ / Σ nᵢ` over `(nᵢ, xᵢ)` pairs of finite values (`None` without weight): summed so,
/// as the docs and the participants' own arithmetic have it, while that stays finite; at the
/// edge of `f64`, where `nᵢ · xᵢ` overflows, as `Σ (nᵢ / N) · xᵢ`, which stays within the
/// values' range (then clamped against the last rounding). An infinite mean would go into the
/// round's record, where JSON cannot hold it: the saved federation would no longer read back.
fn weighted_mean(pairs: &[(f64, f64)]) -> Option<f64> {
    let weight: f64 = pairs.iter().map(|(n, _)| n).sum();
    if weight <= 0.0 {
        return None;
    }
    let mean = pairs.iter().map(|(n, x)| n * x).sum::<f64>() / weight;
    if mean.is_finite() {
        return Some(mean);
    }
    let scaled: f64 = pairs.iter().map(|(n, x)| n / weight * x).sum();
    Some(scaled.clamp(f64::MIN, f64::MAX))
}

impl Evaluation {
    fn summary(&self) -> EvaluationSummary {
        let n_samples = self
            .reports
            .iter()
            .fold(0u64, |sum, r| sum.saturating_add(r.n_samples));
        let pairs: Vec<(f64, f64)> = self
            .reports
            .iter()
            .map(|r| (r.n_samples as f64, r.loss))
            .collect();
        let loss = weighted_mean(&pairs).unwrap_or(0.0);
        EvaluationSummary {
            participants: self.reports.len(),
            asked: self.asked.len(),
            n_samples,
            loss,
            metrics: weighted_means(self.reports.iter().map(|r| (r.n_samples, &r.metrics))),
        }
    }

    fn has_reported(&self, id: &str) -> bool {
        self.reports.iter().any(|r| r.participant_id == id)
    }

    fn waits_for(&self, id: &str) -> bool {
        self.asked.contains(id) && !self.has_reported(id)
    }
}

/// How many evaluations are remembered (the oldest are dropped): as many as the history.
const REMEMBERED: usize = super::HISTORY_ROUNDS;

impl Federation {
    /// Whether the model of `round` is to be evaluated.
    pub(super) fn evaluates(&self, round: u32) -> bool {
        let every = self.settings.evaluate_every;
        every > 0 && (round.is_multiple_of(every) || round == self.settings.rounds)
    }

    fn evaluation_count(&self, candidates: usize) -> usize {
        let share = (self.settings.evaluate_fraction * candidates as f64).ceil() as usize;
        share.clamp(1, candidates.max(1)).min(candidates)
    }

    /// Asks a share of `selected` (those that can evaluate) to evaluate the model of
    /// `model_round`, which a training round about to open starts from.
    pub(super) fn ask_selected<R: Rng + ?Sized>(
        &mut self,
        model_round: u32,
        selected: &[ParticipantId],
        rng: &mut R,
    ) {
        if !self.evaluates(model_round) {
            return;
        }
        let evaluation = self.evaluations.get(&model_round);
        let able: Vec<ParticipantId> = selected
            .iter()
            .filter(|id| self.participants.get(*id).is_some_and(|p| p.can_evaluate))
            .filter(|id| !evaluation.is_some_and(|e| e.has_reported(id)))
            .cloned()
            .collect();
        let asked = choose(able.iter(), self.evaluation_count(able.len()), rng);
        self.remember(model_round, asked, None);
    }

    /// Once the last round closed: asks a share of the participants still alive to evaluate
    /// the final model, until `round_timeout` from `now`.
    pub(super) fn ask_final<R: Rng + ?Sized>(&mut self, now: Timestamp, rng: &mut R) {
        let final_round = self.settings.rounds;
        if !self.evaluates(final_round) || self.final_planned {
            return;
        }
        self.final_planned = true;
        let able: Vec<ParticipantId> = self
            .available()
            .filter(|id| self.participants.get(*id).is_some_and(|p| p.can_evaluate))
            .cloned()
            .collect();
        let asked = choose(able.iter(), self.evaluation_count(able.len()), rng);
        self.remember(final_round, asked, Some(now + self.settings.round_timeout));
    }

    fn remember(&mut self, round: u32, asked: Vec<ParticipantId>, until: Option<Timestamp>) {
        if asked.is_empty() {
            return;
        }
        let evaluation = self.evaluations.entry(round).or_insert_with(|| Evaluation {
            asked: BTreeSet::new(),
            reports: Vec::new(),
            until: None,
        });
        evaluation.asked.extend(asked);
        evaluation.until = until.or(evaluation.until);
        while self.evaluations.len() > REMEMBERED {
            self.evaluations.pop_first();
        }
    }

    /// The model round `id` should evaluate before training round `training_round`, if any.
    pub(super) fn evaluation_due(&self, id: &str, training_round: u32) -> Option<u32> {
        let model_round = training_round.checked_sub(1)?;
        self.evaluations
            .get(&model_round)
            .filter(|e| e.until.is_none() && e.waits_for(id))
            .map(|_| model_round)
    }

    /// In the finished phase: evaluate the final model, or finish.
    pub(super) fn finished_action(&self, id: &str, now: Timestamp) -> Action {
        let round = self.settings.rounds;
        match self.evaluations.get(&round) {
            Some(e) if e.waits_for(id) && e.until.is_some_and(|until| now < until) => {
                Action::Evaluate { round }
            }
            _ => Action::Finish,
        }
    }

    /// A participant's evaluation of the model of `round`. Refused, changing nothing, unless it
    /// was asked and has not reported yet; metrics beyond [`MAX_METRICS_PER_DELIVERY`], with
    /// names over [`MAX_METRIC_NAME_BYTES`] or with non-finite values are refused too.
    pub fn evaluation_reported(
        &mut self,
        id: &str,
        secret: &str,
        report: EvaluationReport,
        round: u32,
        now: Timestamp,
    ) -> Result<EvaluationSummary, EvaluationError> {
        let participant = self.authenticate_member(id, secret)?;
        participant.last_seen = now;
        if !report.loss.is_finite() || report.n_samples == 0 {
            return Err(EvaluationError::Invalid(
                "`loss` must be finite and `n_samples` at least 1".into(),
            ));
        }
        if report.metrics.len() > MAX_METRICS_PER_DELIVERY
            || report
                .metrics
                .iter()
                .any(|(name, value)| name.len() > MAX_METRIC_NAME_BYTES || !value.is_finite())
        {
            return Err(EvaluationError::Invalid(format!(
                "`metrics`: at most {MAX_METRICS_PER_DELIVERY} finite numbers, names of at most \
                 {MAX_METRIC_NAME_BYTES} bytes"
            )));
        }
        let evaluation = self
            .evaluations
            .get_mut(&round)
            .filter(|e| e.asked.contains(id))
            .ok_or_else(|| EvaluationError::NotAsked(id.to_string(), round))?;
        if evaluation.has_reported(id) {
            return Err(EvaluationError::AlreadyReported(id.to_string(), round));
        }
        evaluation.reports.push(EvaluationReport {
            participant_id: id.to_string(),
            ..report
        });
        let summary = evaluation.summary();
        // The record of the attempt that made this model: the last aggregated one of `round`.
        let is_it =
            |outcome: Option<Outcome>, r: u32| r == round && outcome == Some(Outcome::Aggregated);
        if let Some(record) = self
            .history
            .iter_mut()
            .rev()
            .find(|r| is_it(r.outcome, r.round))
        {
            record.evaluation = Some(summary.clone());
        }
        if let Some(line) = self
            .summaries
            .iter_mut()
            .rev()
            .find(|s| is_it(s.outcome, s.round))
        {
            line.evaluation = Some(summary.clone());
        }
        Ok(summary)
    }

    /// Every closed round attempt, oldest first, in one line each.
    pub fn round_summaries(&self) -> &[RoundSummary] {
        &self.summaries
    }

    /// Whether the federation is finished and no participant is still asked to evaluate.
    pub fn evaluation_pending(&self, now: Timestamp) -> bool {
        matches!(self.phase, Phase::Finished)
            && self
                .evaluations
                .get(&self.settings.rounds)
                .is_some_and(|e| {
                    e.until.is_some_and(|until| now < until)
                        && e.asked.iter().any(|id| e.waits_for(id))
                })
    }
}
