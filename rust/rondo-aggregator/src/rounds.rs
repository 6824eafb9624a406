//! The aggregator's state: the global model, the round that accepts uploads, its tokens and its
//! running sum. Plain data behind one mutex; the HTTP and RPC edges call in.
//!
//! Model-sized memory circulates rather than being mapped in afresh each round: a round's sum
//! becomes the served model file in place, and a model file, once replaced and no longer being
//! downloaded, becomes a later round's sum ([`crate::spare`]).
//!
//! Invariant: an update is folded into the sum and recorded as accepted exactly once, or not at
//! all. Staging and validation happen before (see [`crate::wire`]), so a rejected or
//! interrupted upload never touches the sum; [`RoundBook::begin_commit`] and
//! [`RoundBook::finish_commit`] bracket the fold, and a round only closes when no fold is in
//! flight.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use rondo_core::aggregate::ModelBuffer;
use rondo_core::federation::{self, AggregationResult, SecretHash};
use rondo_core::model::ModelSpec;
use rondo_core::strategy::{
    FedAvg, NOT_FINITE, RoundAggregation, RoundStart, Strategy, model_is_finite,
};

use crate::spare::{Recycled, SpareSum, release};
use crate::wire;

/// The current global model, serialized once and shared by every download.
#[derive(Debug, Clone)]
pub struct GlobalModel {
    pub round: u32,
    pub spec: Arc<ModelSpec>,
    pub file: Bytes,
}

#[derive(Debug)]
struct OpenRound {
    round: u32,
    attempt: u32,
    /// participant id → its token's hash. Tokens are only ever checked here, never handed
    /// out, so only their hashes are kept.
    grants: Grants,
    /// token hash → participant id.
    tokens: HashMap<SecretHash, String>,
    accepted: BTreeMap<String, u64>,
    /// participant id → the SHA-256 of its accepted update's bytes (hex), when the update was
    /// saved for recovery: a retry of the same bytes is then told it got in.
    digests: HashMap<String, String>,
    uploading: HashSet<String>,
    /// Participants whose validated update is being folded into `sum` right now.
    committing: HashSet<String>,
    /// Set by `begin_close`: no new commit may start.
    closing: bool,
    sum: Option<RoundSum>,
    /// Why the round can no longer produce a model (a fold that never finished), if so.
    broken: Option<String>,
}

/// A round's aggregation, shared by the folds in flight (boxed so that the last owner can
/// consume it in [`RoundAggregation::finalize`]).
pub type RoundSum = Arc<Box<dyn RoundAggregation>>;

/// participant id → the SHA-256 of its one-round token.
pub type Grants = BTreeMap<String, SecretHash>;

/// The grants of an opening, hashed.
fn hashed(grants: &BTreeMap<String, String>) -> Grants {
    grants
        .iter()
        .map(|(participant, token)| (participant.clone(), SecretHash::of(token)))
        .collect()
}

/// A token resolved to what it grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub participant_id: String,
    pub round: u32,
    pub attempt: u32,
}

/// Why a token or an upload is refused before any byte of the body is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantError {
    InvalidToken,
    TokenExpired,
    WrongRound {
        token_round: u32,
    },
    Duplicate,
    InProgress,
    /// The uploader named another participant than the one the token was issued to.
    NotYours {
        claimed: String,
    },
}

/// Why an update that was read and validated still cannot be folded in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    #[error("the round closed before the upload completed")]
    RoundClosed,
    #[error("this participant's update was already accepted in this round")]
    Duplicate,
    #[error("{0}")]
    Mismatch(String),
    /// The update could not be made recoverable (the store or the disk failed): not taken.
    #[error("the update could not be saved: {0}")]
    Unsaved(String),
}

impl CommitError {
    /// The error code the participant sees.
    pub fn code(&self) -> &'static str {
        match self {
            Self::RoundClosed => "token_expired",
            Self::Duplicate => "duplicate_update",
            Self::Mismatch(_) => "model_mismatch",
            Self::Unsaved(_) => "store_unavailable",
        }
    }
}

/// What [`RoundBook::begin_close`] found.
#[derive(Debug)]
pub enum Closing {
    /// The round closed before: its recorded result, to send again.
    Closed(AggregationResult),
    /// Another caller is finalizing it right now and will report the result.
    InProgress,
    /// Updates are still being folded: wait for [`RoundBook::finish_commit`] and try again.
    CommitsInFlight { folding: usize },
    /// The round is out of the book: finalize it off the lock, then hand the result to
    /// [`RoundBook::finish_close`].
    Ready(ClosingRound),
}

/// A round taken out of the book to be finalized, with everything its result needs.
#[derive(Debug)]
pub struct ClosingRound {
    round: u32,
    attempt: u32,
    grants: Grants,
    accepted: BTreeMap<String, u64>,
    sum: Option<RoundSum>,
    /// Set when the round cannot produce a model whatever its sum holds.
    failure: Option<String>,
    /// The global model the round started from.
    previous: Option<GlobalModel>,
}

/// A [`ClosingRound`] after its finalize pass.
#[derive(Debug)]
pub struct FinalizedRound {
    closing: ClosingRound,
    /// The next model file (header written) and its spec, or why there is none.
    model: Result<(ModelBuffer, ModelSpec, usize), String>,
}

impl ClosingRound {
    /// The finalize pass: reads the whole sum, so it runs off the book's lock. A model with a
    /// NaN or infinite value is never published (finite updates can still sum past f32's
    /// range): the round fails with that reason instead.
    pub fn finalize(mut self) -> FinalizedRound {
        let model = match (self.failure.take(), self.sum.take()) {
            (Some(reason), _) => Err(reason),
            (None, None) => Err("no update was accepted".to_string()),
            (None, Some(sum)) => match Arc::try_unwrap(sum) {
                Err(_) => Err("the round's sum is still in use by a fold".to_string()),
                Ok(sum) if sum.updates() == 0 => Err("no update was accepted".to_string()),
                Ok(sum) => {
                    let updates = sum.updates();
                    let spec = sum.spec().clone();
                    let previous = self.previous.as_ref().map(|m| model_data(&m.file));
                    sum.finalize(previous).and_then(|finalized| {
                        let mut buffer = finalized.model;
                        if !finalized.checked_finite && !model_is_finite(&spec, buffer.data()) {
                            return Err(NOT_FINITE.to_string());
                        }
                        buffer
                            .prefix_mut()
                            .copy_from_slice(&wire::model_header(&spec, self.round));
                        Ok((buffer, spec, updates))
                    })
                }
            },
        };
        FinalizedRound {
            closing: self,
            model,
        }
    }
}

/// A round's new model, for the model store to keep before the round is reported.
#[derive(Debug)]
pub struct ProducedModel<'a> {
    pub round: u32,
    pub attempt: u32,
    /// The whole model file, header included: the bytes that will be served.
    pub file: &'a [u8],
    pub contributors: &'a BTreeMap<String, u64>,
}

impl FinalizedRound {
    /// The model this round produced, if it produced one.
    pub fn produced(&self) -> Option<ProducedModel<'_>> {
        let (buffer, _, _) = self.model.as_ref().ok()?;
        Some(ProducedModel {
            round: self.closing.round,
            attempt: self.closing.attempt,
            file: buffer.as_ref(),
            contributors: &self.closing.accepted,
        })
    }

    /// The round fails with `reason` instead of publishing its model (it could not be kept).
    pub fn fail(self, reason: String) -> Self {
        Self {
            model: Err(reason),
            ..self
        }
    }
}

/// The data section of a model file laid out by [`wire::model_header`] (8-byte length, JSON
/// header, tensors).
fn model_data(file: &[u8]) -> &[u8] {
    &file[model_data_offset(file)..]
}

/// [`model_data`] as shared bytes (no copy).
fn model_data_bytes(file: &Bytes) -> Bytes {
    file.slice(model_data_offset(file)..)
}

fn model_data_offset(file: &[u8]) -> usize {
    let header_len = file
        .get(..8)
        .and_then(|n| <[u8; 8]>::try_from(n).ok())
        .map_or(0, |n| u64::from_le_bytes(n) as usize);
    (8 + header_len).min(file.len())
}

#[derive(Debug)]
pub struct RoundBook {
    strategy: Arc<dyn Strategy>,
    model: Option<GlobalModel>,
    open: Option<OpenRound>,
    /// `(round, attempt)` of a round being finalized off the lock.
    closing: Option<(u32, u32)>,
    /// Tokens of closed rounds, so that late callers hear "expired" rather than "invalid".
    retired_tokens: HashSet<SecretHash>,
    /// Results (and grants) of closed rounds, for idempotent `close_round` and `open_round`
    /// retries.
    closed: BTreeMap<(u32, u32), (AggregationResult, Grants)>,
    spare: Arc<SpareSum>,
}

/// How many closed rounds' results and tokens to remember.
const REMEMBERED_ROUNDS: usize = 4;

impl RoundBook {
    pub fn new(model: Option<GlobalModel>, strategy: Arc<dyn Strategy>) -> Self {
        Self {
            strategy,
            model,
            open: None,
            closing: None,
            retired_tokens: HashSet::new(),
            closed: BTreeMap::new(),
            spare: Arc::default(),
        }
    }

    pub fn strategy(&self) -> &Arc<dyn Strategy> {
        &self.strategy
    }

    /// A book whose global model, for round 1 on, is `file` (its header written), the model of
    /// round 0.
    pub fn with_initial_model(
        spec: ModelSpec,
        file: ModelBuffer,
        strategy: Arc<dyn Strategy>,
    ) -> Self {
        Self::with_model(0, spec, file, strategy)
    }

    /// A book whose global model is `file`, the model of `round` (one read back from the
    /// model store after a restart).
    pub fn with_model(
        round: u32,
        spec: ModelSpec,
        file: ModelBuffer,
        strategy: Arc<dyn Strategy>,
    ) -> Self {
        let mut book = Self::new(None, strategy);
        book.model = Some(GlobalModel {
            round,
            spec: Arc::new(spec),
            file: book.served(file),
        });
        book
    }

    /// A finished model file as the shared bytes every download is served from.
    fn served(&self, file: ModelBuffer) -> Bytes {
        Bytes::from_owner(Recycled {
            buffer: Some(file),
            spare: Arc::downgrade(&self.spare),
        })
    }

    pub fn model(&self) -> Option<&GlobalModel> {
        self.model.as_ref()
    }

    pub fn open_round_id(&self) -> Option<(u32, u32)> {
        self.open.as_ref().map(|o| (o.round, o.attempt))
    }

    pub fn accepted(&self) -> Vec<String> {
        self.open
            .as_ref()
            .map(|o| o.accepted.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// A fresh sum for a training round on the current model, to be built outside the lock
    /// (allocating a large sum takes a while) and handed to [`RoundBook::open_round`].
    pub fn sum_builder(
        &self,
        round: u32,
    ) -> Option<impl FnOnce() -> Box<dyn RoundAggregation> + use<>> {
        let model = self.model.as_ref().filter(|_| round > 0)?;
        let (spec, previous) = (model.spec.clone(), model_data_bytes(&model.file));
        let strategy = self.strategy.clone();
        let spare = self.spare.clone();
        Some(move || {
            strategy.begin_round(RoundStart {
                round,
                prefix: wire::model_header(&spec, round).len(),
                spec: (*spec).clone(),
                spare: spare.take(),
                previous: Some(previous),
            })
        })
    }

    /// Maps in the memory of the next round's sum ahead of time, to be run off the lock (at
    /// start-up, while participants are still starting), so that the first round opens
    /// without waiting for it. `None` without a global model.
    pub fn spare_preparer(&self) -> Option<impl FnOnce() + use<>> {
        let model = self.model.as_ref()?;
        let prefix = wire::model_header(&model.spec, model.round + 1).len();
        let data_len = model.spec.byte_len();
        let spare = self.spare.clone();
        Some(move || {
            if spare.begin_preparing() {
                drop(spare.put(ModelBuffer::zeroed(prefix, data_len).into_words()));
            }
        })
    }

    /// Opens a round, with a sum prepared by [`RoundBook::sum_builder`] when there is one (else
    /// the first update creates it). The same opening twice is a no-op, and so is a stale retry
    /// of a round already closed.
    pub fn open_round(
        &mut self,
        opening: &federation::OpenRound,
        sum: Option<Box<dyn RoundAggregation>>,
    ) -> Result<(), String> {
        self.open_hashed(opening.round, opening.attempt, hashed(&opening.grants), sum)
    }

    /// Opens a round from its grants' hashes: a round read back after a restart (see
    /// [`crate::durable`]), whose tokens were never kept.
    pub fn reopen(
        &mut self,
        round: u32,
        attempt: u32,
        grants: Grants,
        sum: Option<Box<dyn RoundAggregation>>,
    ) -> Result<(), String> {
        self.open_hashed(round, attempt, grants, sum)
    }

    fn open_hashed(
        &mut self,
        round: u32,
        attempt: u32,
        grants: Grants,
        sum: Option<Box<dyn RoundAggregation>>,
    ) -> Result<(), String> {
        let id = (round, attempt);
        // The same opening again is a retry. A different one with the same number comes from a
        // coordinator that restarted and lost count: it replaces whatever this round was.
        if self
            .closed
            .get(&id)
            .is_some_and(|(_, closed)| *closed == grants)
        {
            return Ok(());
        }
        self.closed.remove(&id);
        if let Some(open) = &self.open {
            if (open.round, open.attempt) == id && open.grants == grants {
                return Ok(());
            }
            // Updates folded so far belong to participants the coordinator no longer knows
            // (or to a round it gave up); the round is redone with the new grants.
            tracing::warn!(
                round = open.round,
                attempt = open.attempt,
                accepted = open.accepted.len(),
                "the coordinator opens another round before this one closed; dropping its partial sum"
            );
            self.retire_open_tokens();
        }
        if round > 0 && self.model.is_none() {
            return Err(format!(
                "round {round} needs a global model and this aggregator has none (round 0 sets it)"
            ));
        }
        self.open = Some(OpenRound {
            round,
            attempt,
            tokens: grants
                .iter()
                .map(|(participant, hash)| (*hash, participant.clone()))
                .collect(),
            grants,
            accepted: BTreeMap::new(),
            digests: HashMap::new(),
            uploading: HashSet::new(),
            committing: HashSet::new(),
            closing: false,
            sum: sum
                .filter(|s| Some(s.spec()) == self.model.as_ref().map(|m| &*m.spec))
                .map(Arc::new),
            broken: None,
        });
        let has_sum = self.open.as_ref().is_some_and(|o| o.sum.is_some());
        release(self.spare.set_sum_in_use(has_sum));
        Ok(())
    }

    /// The grants' hashes of the open round (what [`crate::durable`] saves of an opening).
    pub fn open_grants(&self) -> Option<Grants> {
        self.open.as_ref().map(|o| o.grants.clone())
    }

    /// An upload refused as [`GrantError::Duplicate`]: the grant, and the digest and sample
    /// count of the update accepted for it, when that update was saved with its digest.
    pub fn accepted_update(&self, token: &str, round: u32) -> Option<(Grant, String, u64)> {
        let grant = self.authorize_download(token, round).ok()?;
        let open = self.open.as_ref()?;
        let digest = open.digests.get(&grant.participant_id)?.clone();
        let n_samples = *open.accepted.get(&grant.participant_id)?;
        Some((grant, digest, n_samples))
    }

    fn find_token(&self, token: &str) -> Result<Grant, GrantError> {
        let open = self
            .open
            .as_ref()
            .ok_or_else(|| self.unknown_token(token))?;
        // A lookup by the token's hash: what the map's probing could reveal is about hashes,
        // not about the token.
        let participant = open
            .tokens
            .get(&SecretHash::of(token))
            .cloned()
            .ok_or_else(|| self.unknown_token(token))?;
        Ok(Grant {
            participant_id: participant,
            round: open.round,
            attempt: open.attempt,
        })
    }

    fn unknown_token(&self, token: &str) -> GrantError {
        if self.retired_tokens.contains(&SecretHash::of(token)) {
            GrantError::TokenExpired
        } else {
            GrantError::InvalidToken
        }
    }

    /// Resolves a token presented for a download of round `round`.
    pub fn authorize_download(&self, token: &str, round: u32) -> Result<Grant, GrantError> {
        let grant = self.find_token(token)?;
        if grant.round != round {
            return Err(GrantError::WrongRound {
                token_round: grant.round,
            });
        }
        Ok(grant)
    }

    /// Resolves a token presented for an upload to round `round` and marks the participant as
    /// uploading (call [`RoundBook::end_upload`] when done, whatever the outcome).
    pub fn begin_upload(&mut self, token: &str, round: u32) -> Result<Grant, GrantError> {
        self.begin_upload_by(token, round, None)
    }

    /// [`RoundBook::begin_upload`] for an uploader that names itself (`claimed`): a token
    /// issued to another participant is refused before anything is marked.
    pub fn begin_upload_by(
        &mut self,
        token: &str,
        round: u32,
        claimed: Option<&str>,
    ) -> Result<Grant, GrantError> {
        let grant = self.authorize_download(token, round)?;
        if let Some(claimed) = claimed
            && claimed != grant.participant_id
        {
            return Err(GrantError::NotYours {
                claimed: claimed.to_string(),
            });
        }
        let open = self.open.as_mut().expect("find_token found an open round");
        if open.accepted.contains_key(&grant.participant_id) {
            return Err(GrantError::Duplicate);
        }
        if !open.uploading.insert(grant.participant_id.clone()) {
            return Err(GrantError::InProgress);
        }
        Ok(grant)
    }

    pub fn end_upload(&mut self, grant: &Grant) {
        if let Some(open) = self.open.as_mut()
            && (open.round, open.attempt) == (grant.round, grant.attempt)
        {
            open.uploading.remove(&grant.participant_id);
        }
    }

    /// The spec an upload to the open round must match, if known yet (round 0 learns it from
    /// the first accepted upload).
    pub fn expected_spec(&self) -> Option<Arc<ModelSpec>> {
        let open = self.open.as_ref()?;
        if open.round == 0 {
            return open.sum.as_ref().map(|s| Arc::new(s.spec().clone()));
        }
        self.model.as_ref().map(|m| m.spec.clone())
    }

    /// Starts folding a validated update: checks the round is still open and the participant
    /// has no accepted update, and hands out the round's sum (created by the first update of
    /// round 0, whose shape becomes the model's). Follow with [`RoundBook::finish_commit`], or
    /// [`RoundBook::abort_commit`] if the fold cannot finish.
    pub fn begin_commit(
        &mut self,
        grant: &Grant,
        spec: &ModelSpec,
    ) -> Result<RoundSum, CommitError> {
        let global = self
            .model
            .as_ref()
            .map(|m| (m.spec.clone(), model_data_bytes(&m.file)));
        let strategy = self.strategy.clone();
        let open = match self.open.as_mut() {
            Some(open)
                if (open.round, open.attempt) == (grant.round, grant.attempt) && !open.closing =>
            {
                open
            }
            _ => return Err(CommitError::RoundClosed),
        };
        if open.accepted.contains_key(&grant.participant_id)
            || open.committing.contains(&grant.participant_id)
        {
            return Err(CommitError::Duplicate);
        }
        let round = open.round;
        if open.sum.is_none() {
            release(self.spare.set_sum_in_use(true));
        }
        let sum = open.sum.get_or_insert_with(|| {
            // Room for the next model file's header, so the sum can become that file in place.
            let start = |spec: ModelSpec, previous| RoundStart {
                round,
                prefix: wire::model_header(&spec, round).len(),
                spec,
                spare: None,
                previous,
            };
            Arc::new(match global {
                Some((global_spec, previous)) if round > 0 => {
                    strategy.begin_round(start((*global_spec).clone(), Some(previous)))
                }
                // Round 0 makes the initial model: the first upload as it is, whatever rule
                // the training rounds use.
                _ => FedAvg::default().begin_round(start(spec.clone(), None)),
            })
        });
        sum.spec()
            .check_update(spec)
            .map_err(|e| CommitError::Mismatch(e.to_string()))?;
        open.committing.insert(grant.participant_id.clone());
        Ok(sum.clone())
    }

    /// Records the outcome of a fold started by [`RoundBook::begin_commit`] (`Some(n_samples)`
    /// when the update is now part of the sum). Returns whether it was recorded as accepted:
    /// `false` when the fold failed, or when the round was given up meanwhile.
    pub fn finish_commit(&mut self, grant: &Grant, n_samples: Option<u64>) -> bool {
        self.finish_commit_saved(grant, n_samples, None)
    }

    /// [`RoundBook::finish_commit`] of an update saved for recovery with `digest`.
    pub fn finish_commit_saved(
        &mut self,
        grant: &Grant,
        n_samples: Option<u64>,
        digest: Option<String>,
    ) -> bool {
        match self.open.as_mut() {
            Some(open) if (open.round, open.attempt) == (grant.round, grant.attempt) => {
                open.committing.remove(&grant.participant_id);
                if let Some(n) = n_samples {
                    open.accepted.insert(grant.participant_id.clone(), n);
                    if let Some(digest) = digest {
                        open.digests.insert(grant.participant_id.clone(), digest);
                    }
                }
                n_samples.is_some()
            }
            _ => false,
        }
    }

    /// A fold started by [`RoundBook::begin_commit`] ended without saying whether the update
    /// is in the sum (it panicked): the sum can no longer be trusted, so the round will fail.
    pub fn abort_commit(&mut self, grant: &Grant, reason: &str) {
        if let Some(open) = self.open.as_mut()
            && (open.round, open.attempt) == (grant.round, grant.attempt)
            && open.committing.remove(&grant.participant_id)
        {
            open.broken.get_or_insert_with(|| {
                format!(
                    "the update of {} could not be folded in: {reason}",
                    grant.participant_id
                )
            });
        }
    }

    /// Folds in flight in the open round.
    pub fn commits_in_flight(&self) -> usize {
        self.open.as_ref().map_or(0, |o| o.committing.len())
    }

    /// Whether `(round, attempt)` is open, closing or closed here (so that a close request for
    /// it makes sense).
    pub fn knows_round(&self, round: u32, attempt: u32) -> bool {
        let id = (round, attempt);
        self.open_round_id() == Some(id)
            || self.closing == Some(id)
            || self.closed.contains_key(&id)
    }

    /// Starts closing the open round `(round, attempt)`: no new commit may begin. Once no fold
    /// is in flight (or when `give_up` says the caller stopped waiting for them: the round then
    /// fails) the round leaves the book as a [`ClosingRound`] to finalize. Closing a round that
    /// was already closed returns its recorded result.
    pub fn begin_close(
        &mut self,
        round: u32,
        attempt: u32,
        give_up: bool,
    ) -> Result<Closing, String> {
        if let Some((result, _)) = self.closed.get(&(round, attempt)) {
            return Ok(Closing::Closed(result.clone()));
        }
        if self.closing == Some((round, attempt)) {
            return Ok(Closing::InProgress);
        }
        let mut failure = None;
        match self.open.as_mut() {
            Some(open) if (open.round, open.attempt) == (round, attempt) => {
                open.closing = true;
                let folding = open.committing.len();
                if folding > 0 {
                    if !give_up {
                        return Ok(Closing::CommitsInFlight { folding });
                    }
                    failure = Some(format!(
                        "{folding} update(s) were still being folded when the close stopped \
                         waiting for them"
                    ));
                }
            }
            _ => return Err(format!("round {round} attempt {attempt} is not open")),
        }
        let Some(open) = self.open.take() else {
            unreachable!("matched above")
        };
        // From here on the old model's memory may become the next round's sum.
        release(self.spare.set_sum_in_use(false));
        self.closing = Some((round, attempt));
        // Late callers hear "expired" from now on, not "invalid".
        self.retired_tokens.extend(open.tokens.into_keys());
        Ok(Closing::Ready(ClosingRound {
            round,
            attempt,
            grants: open.grants,
            accepted: open.accepted,
            sum: open.sum,
            failure: failure.or(open.broken),
            previous: self.model.clone(),
        }))
    }

    /// Records a finalized round: its model becomes the global model, or the round failed and
    /// the previous model stays. Returns the result to report.
    pub fn finish_close(&mut self, finalized: FinalizedRound) -> AggregationResult {
        let FinalizedRound { closing, model } = finalized;
        let (round, attempt) = (closing.round, closing.attempt);
        if self.closing == Some((round, attempt)) {
            self.closing = None;
        }
        // Our reference to the old model goes first, so that replacing it below frees it.
        drop(closing.previous);
        let total_samples: u64 = closing.accepted.values().sum();
        let result = match model {
            Ok((buffer, spec, updates)) => {
                // Participants have downloaded the old model by now: let it go (its memory
                // becomes the next round's sum, see `SpareSum`, or goes back to the system).
                if let Some(old) = self.model.take() {
                    let bytes = old.file.len();
                    rondo_core::memory::drop_large(old, bytes);
                }
                self.model = Some(GlobalModel {
                    round,
                    spec: Arc::new(spec),
                    file: self.served(buffer),
                });
                AggregationResult::Aggregated {
                    updates,
                    total_samples,
                    contributors: closing.accepted,
                }
            }
            Err(reason) => AggregationResult::Failed { reason },
        };
        self.closed
            .insert((round, attempt), (result.clone(), closing.grants));
        while self.closed.len() > REMEMBERED_ROUNDS {
            self.closed.pop_first();
        }
        if self.retired_tokens.len() > 100_000 {
            self.retired_tokens.clear();
        }
        result
    }

    /// Closes `(round, attempt)` in one go, finalizing under the caller's lock; for tests
    /// (the service finalizes off the lock, see [`crate::service::Aggregator`]).
    #[cfg(test)]
    pub fn close_round(&mut self, round: u32, attempt: u32) -> Result<Closing, String> {
        match self.begin_close(round, attempt, false)? {
            Closing::Ready(closing) => {
                let finalized = closing.finalize();
                Ok(Closing::Closed(self.finish_close(finalized)))
            }
            other => Ok(other),
        }
    }

    fn retire_open_tokens(&mut self) {
        if let Some(open) = self.open.take() {
            self.retired_tokens.extend(open.tokens.into_keys());
            release(self.spare.set_sum_in_use(false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::StagingBuffer;
    use crate::wire::StagedUpdate;
    use rondo_core::aggregate::Update;
    use rondo_core::kernels::{decode_values, encode_values};
    use rondo_core::model::{DType, TensorSpec};
    use rondo_core::strategy::FedAvg;

    fn fedavg() -> Arc<dyn Strategy> {
        Arc::new(FedAvg::default())
    }

    fn closed(result: Result<Closing, String>) -> AggregationResult {
        match result {
            Ok(Closing::Closed(result)) => result,
            other => panic!("expected a closed round, got {other:?}"),
        }
    }

    fn spec() -> ModelSpec {
        ModelSpec {
            tensors: vec![TensorSpec {
                name: "w".into(),
                dtype: DType::F32,
                shape: vec![2],
            }],
        }
    }

    fn update(values: &[f64], n: u64) -> StagedUpdate {
        StagedUpdate {
            spec: spec(),
            data: StagingBuffer::unpooled(encode_values(DType::F32, values)),
            n_samples: n,
            metrics: BTreeMap::new(),
        }
    }

    fn opening(round: u32, attempt: u32, who: &[(&str, &str)]) -> federation::OpenRound {
        federation::OpenRound {
            round,
            attempt,
            grants: who
                .iter()
                .map(|(p, t)| (p.to_string(), t.to_string()))
                .collect(),
        }
    }

    /// Begins, folds and finishes a commit in one go, as the HTTP edge does in three steps.
    fn commit(
        book: &mut RoundBook,
        grant: &Grant,
        update: &StagedUpdate,
    ) -> Result<(), CommitError> {
        let sum = book.begin_commit(grant, &update.spec)?;
        let folded = sum.add(Update {
            key: grant.participant_id.clone(),
            spec: update.spec.clone(),
            data: Bytes::copy_from_slice(&update.data),
            weight: update.n_samples as f64,
            metrics: Default::default(),
        });
        drop(sum);
        let recorded = book.finish_commit(grant, folded.is_ok().then_some(update.n_samples));
        assert_eq!(recorded, folded.is_ok());
        folded.map_err(|e| CommitError::Mismatch(e.to_string()))
    }

    fn model_values(book: &RoundBook) -> Vec<f64> {
        let file = &book.model().unwrap().file;
        let (_, data) = wire::read_model_file(file).unwrap();
        decode_values(DType::F32, &data)
    }

    #[test]
    fn round_zero_sets_the_model_and_round_one_averages() {
        let mut book = RoundBook::new(None, fedavg());
        book.open_round(&opening(0, 0, &[("p", "t0")]), None)
            .unwrap();
        let g = book.begin_upload("t0", 0).unwrap();
        commit(&mut book, &g, &update(&[1.0, 2.0], 1)).unwrap();
        book.end_upload(&g);
        assert!(matches!(
            closed(book.close_round(0, 0)),
            AggregationResult::Aggregated { updates: 1, .. }
        ));
        assert_eq!(model_values(&book), vec![1.0, 2.0]);

        book.open_round(&opening(1, 0, &[("p", "t1"), ("q", "t2")]), None)
            .unwrap();
        for (token, values, n) in [("t1", [2.0, 2.0], 1), ("t2", [4.0, 6.0], 3)] {
            let g = book.begin_upload(token, 1).unwrap();
            commit(&mut book, &g, &update(&values, n)).unwrap();
            book.end_upload(&g);
        }
        assert_eq!(
            closed(book.close_round(1, 0)),
            AggregationResult::Aggregated {
                updates: 2,
                total_samples: 4,
                contributors: BTreeMap::from([("p".into(), 1), ("q".into(), 3)]),
            }
        );
        assert_eq!(model_values(&book), vec![3.5, 5.0]);
        assert_eq!(book.model().unwrap().round, 1);
    }

    /// Runs round `round` as the aggregator does (the sum from `sum_builder`), with one update.
    fn run_round(book: &mut RoundBook, round: u32, values: &[f64]) {
        let token = format!("t{round}");
        let sum = book.sum_builder(round).map(|build| build());
        book.open_round(&opening(round, 0, &[("p", &token)]), sum)
            .unwrap();
        let g = book.begin_upload(&token, round).unwrap();
        commit(book, &g, &update(values, 1)).unwrap();
        book.end_upload(&g);
        closed(book.close_round(round, 0));
    }

    /// Waits for the old model's memory to reach the spare (it is dropped on a thread).
    fn wait_for_spare(book: &RoundBook) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !book.spare.is_ready() {
            assert!(std::time::Instant::now() < deadline, "no spare sum arrived");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn a_replaced_model_becomes_a_later_sum_once_no_download_holds_it() {
        let mut book = RoundBook::new(None, fedavg());
        run_round(&mut book, 0, &[1.0, 2.0]);
        let first = book.model().unwrap().file.as_ptr();
        run_round(&mut book, 1, &[3.0, 3.0]);
        wait_for_spare(&book);
        run_round(&mut book, 2, &[5.0, 7.0]);
        assert_eq!(model_values(&book), vec![5.0, 7.0]);
        assert_eq!(
            book.model().unwrap().file.as_ptr(),
            first,
            "round 2 summed in round 0's memory"
        );

        // A download still in progress keeps the model's memory for itself.
        let downloading = book.model().unwrap().file.clone();
        run_round(&mut book, 3, &[1.0, 1.0]);
        std::thread::sleep(std::time::Duration::from_millis(20));
        run_round(&mut book, 4, &[2.0, 4.0]);
        assert_ne!(book.model().unwrap().file.as_ptr(), downloading.as_ptr());
        assert_eq!(model_values(&book), vec![2.0, 4.0]);
        let (_, data) = wire::read_model_file(&downloading).unwrap();
        assert_eq!(
            decode_values(DType::F32, &data),
            vec![5.0, 7.0],
            "left as it was"
        );
    }

    #[test]
    fn tokens_are_checked_and_nothing_counts_twice() {
        let mut book = RoundBook::new(None, fedavg());
        book.open_round(&opening(0, 0, &[("p", "t0-secret"), ("q", "u0")]), None)
            .unwrap();
        // Only the tokens' hashes are kept: nothing of the book shows one.
        assert!(!format!("{book:?}").contains("t0-secret"));
        assert_eq!(book.begin_upload("nope", 0), Err(GrantError::InvalidToken));
        assert_eq!(
            book.begin_upload("t0-secret", 1),
            Err(GrantError::WrongRound { token_round: 0 })
        );
        let g = book.begin_upload("t0-secret", 0).unwrap();
        assert_eq!(
            book.begin_upload("t0-secret", 0),
            Err(GrantError::InProgress)
        );
        commit(&mut book, &g, &update(&[1.0, 1.0], 1)).unwrap();
        assert_eq!(
            commit(&mut book, &g, &update(&[9.0, 9.0], 1)),
            Err(CommitError::Duplicate)
        );
        book.end_upload(&g);
        assert_eq!(
            book.begin_upload("t0-secret", 0),
            Err(GrantError::Duplicate)
        );
        let late = book.begin_upload("u0", 0).unwrap();
        let first = closed(book.close_round(0, 0));
        assert_eq!(closed(book.close_round(0, 0)), first, "close is idempotent");
        assert_eq!(
            commit(&mut book, &late, &update(&[5.0, 5.0], 1)),
            Err(CommitError::RoundClosed)
        );
        assert_eq!(
            book.begin_upload("t0-secret", 0),
            Err(GrantError::TokenExpired)
        );
        assert_eq!(model_values(&book), vec![1.0, 1.0]);
    }

    #[test]
    fn close_waits_for_commits_in_flight_and_then_refuses_new_ones() {
        let mut book = RoundBook::new(None, fedavg());
        book.open_round(&opening(0, 0, &[("p", "t0"), ("q", "u0")]), None)
            .unwrap();
        let p = book.begin_upload("t0", 0).unwrap();
        let q = book.begin_upload("u0", 0).unwrap();
        let staged = update(&[2.0, 4.0], 1);
        let sum = book.begin_commit(&p, &staged.spec).unwrap();
        assert!(matches!(
            book.close_round(0, 0),
            Ok(Closing::CommitsInFlight { folding: 1 })
        ));
        assert_eq!(
            book.begin_commit(&q, &staged.spec).err(),
            Some(CommitError::RoundClosed),
            "a closing round takes no new commit"
        );
        sum.add(Update {
            key: "p".into(),
            spec: staged.spec.clone(),
            data: Bytes::copy_from_slice(&staged.data),
            weight: 1.0,
            metrics: Default::default(),
        })
        .unwrap();
        drop(sum);
        assert!(book.finish_commit(&p, Some(1)));
        assert!(matches!(
            closed(book.close_round(0, 0)),
            AggregationResult::Aggregated { updates: 1, .. }
        ));
        assert_eq!(model_values(&book), vec![2.0, 4.0]);
    }

    #[test]
    fn reopening_is_idempotent_and_empty_rounds_fail() {
        let mut book = RoundBook::new(None, fedavg());
        let o = opening(0, 0, &[("p", "t0")]);
        book.open_round(&o, None).unwrap();
        book.open_round(&o, None).unwrap();
        assert!(matches!(
            closed(book.close_round(0, 0)),
            AggregationResult::Failed { .. }
        ));
        assert!(book.model().is_none());
        book.open_round(&o, None).unwrap();
        assert_eq!(
            book.open_round_id(),
            None,
            "a stale re-open of a closed round is ignored"
        );
        assert!(
            book.open_round(&opening(1, 0, &[("p", "t1")]), None)
                .is_err()
        );
    }

    #[test]
    fn a_model_that_is_not_finite_is_never_published() {
        let mut book = RoundBook::new(None, fedavg());
        run_round(&mut book, 0, &[1.0, 2.0]);
        // Finite values and sample counts whose weighted sum overflows f32.
        let sum = book.sum_builder(1).map(|build| build());
        book.open_round(&opening(1, 0, &[("p", "t1"), ("q", "u1")]), sum)
            .unwrap();
        for token in ["t1", "u1"] {
            let g = book.begin_upload(token, 1).unwrap();
            commit(&mut book, &g, &update(&[3e38, 1.0], 1_000_000_000)).unwrap();
            book.end_upload(&g);
        }
        match closed(book.close_round(1, 0)) {
            AggregationResult::Failed { reason } => {
                assert!(reason.contains("not finite"), "{reason}")
            }
            other => panic!("the round must fail, got {other:?}"),
        }
        assert_eq!(book.model().unwrap().round, 0, "the previous model stays");
        assert_eq!(model_values(&book), vec![1.0, 2.0]);
        // The next attempt runs on it as usual.
        let sum = book.sum_builder(1).map(|build| build());
        book.open_round(&opening(1, 1, &[("p", "t2")]), sum)
            .unwrap();
        let g = book.begin_upload("t2", 1).unwrap();
        commit(&mut book, &g, &update(&[5.0, 6.0], 2)).unwrap();
        assert!(matches!(
            closed(book.close_round(1, 1)),
            AggregationResult::Aggregated { updates: 1, .. }
        ));
        assert_eq!(model_values(&book), vec![5.0, 6.0]);
    }

    #[test]
    fn a_close_that_gives_up_on_a_stuck_fold_fails_the_round_and_the_fold_is_not_counted() {
        let mut book = RoundBook::new(None, fedavg());
        book.open_round(&opening(0, 0, &[("p", "t0"), ("q", "u0")]), None)
            .unwrap();
        let p = book.begin_upload("t0", 0).unwrap();
        commit(&mut book, &p, &update(&[1.0, 1.0], 1)).unwrap();
        let q = book.begin_upload("u0", 0).unwrap();
        let staged = update(&[9.0, 9.0], 1);
        let stuck = book.begin_commit(&q, &staged.spec).unwrap();
        assert!(matches!(
            book.begin_close(0, 0, false),
            Ok(Closing::CommitsInFlight { folding: 1 })
        ));
        let Ok(Closing::Ready(closing)) = book.begin_close(0, 0, true) else {
            panic!("giving up takes the round out")
        };
        assert!(matches!(
            book.begin_close(0, 0, false),
            Ok(Closing::InProgress)
        ));
        let result = book.finish_close(closing.finalize());
        assert!(
            matches!(result, AggregationResult::Failed { ref reason } if reason.contains("still being folded"))
        );
        drop(stuck);
        assert!(!book.finish_commit(&q, Some(1)), "too late to be recorded");
        assert!(matches!(
            closed(book.close_round(0, 0)),
            AggregationResult::Failed { .. }
        ));
        assert!(book.model().is_none());
    }

    #[test]
    fn an_aborted_fold_fails_the_round() {
        let mut book = RoundBook::new(None, fedavg());
        book.open_round(&opening(0, 0, &[("p", "t0"), ("q", "u0")]), None)
            .unwrap();
        let p = book.begin_upload("t0", 0).unwrap();
        commit(&mut book, &p, &update(&[1.0, 1.0], 1)).unwrap();
        let q = book.begin_upload("u0", 0).unwrap();
        let staged = update(&[9.0, 9.0], 1);
        drop(book.begin_commit(&q, &staged.spec).unwrap());
        book.abort_commit(&q, "it panicked");
        assert_eq!(book.commits_in_flight(), 0);
        match closed(book.close_round(0, 0)) {
            AggregationResult::Failed { reason } => assert!(reason.contains("it panicked")),
            other => panic!("the round must fail, got {other:?}"),
        }
    }
}
