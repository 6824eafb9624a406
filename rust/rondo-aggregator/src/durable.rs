//! What the aggregator keeps so that a SIGKILL loses nothing it acknowledged (with a durable
//! `[store] url` and a `store.data_dir`).
//!
//! - The round it serves (`aggregator:round`: round, attempt, the hashes of the grants) is
//!   saved before `open_round` is acknowledged.
//! - Each accepted update's bytes are written to `data_dir/updates/<round>-<attempt>/<n>.update`
//!   and fsynced, and its record (participant, sample count, metrics, SHA-256, file) saved in
//!   the hash `aggregator:accepted:<round>:<attempt>`, before it is folded and acknowledged.
//!   An update whose record exists is part of the round, whatever happened after: a restarted
//!   aggregator folds every recorded update back into the round's sum ([`Durable::load`]), and
//!   a participant that retries an upload that was in fact recorded is told so, not counted
//!   again.
//! - Once a round's model is stored ([`crate::models`]) its update files and records go.
//!
//! The global model itself is not here: it comes from the model store under the same
//! `data_dir`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use bytes::Bytes;
use rondo_core::federation::SecretHash;
use rondo_core::model::ModelSpec;
use rondo_net::store::{Snapshot, Store};

use crate::models::{sha256_hex, write_durably};
use serde::{Deserialize, Serialize};

const ROUND_KEY: &str = "aggregator:round";

fn accepted_key(round: u32, attempt: u32) -> String {
    format!("aggregator:accepted:{round}:{attempt}")
}

/// The round the aggregator serves, as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRound {
    pub round: u32,
    pub attempt: u32,
    /// participant id → the SHA-256 of its token.
    pub grants: BTreeMap<String, SecretHash>,
}

/// One accepted update, as saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedUpdate {
    pub participant_id: String,
    pub n_samples: u64,
    pub metrics: BTreeMap<String, f64>,
    /// SHA-256 of the tensor bytes, hex.
    pub sha256: String,
    pub bytes: u64,
    /// The file under `data_dir/updates`, relative to it.
    pub file: String,
    /// The update's layout: round 0's model takes it from its update.
    pub spec: ModelSpec,
}

/// The aggregator's durable side: the store, where update files go, and a copy of what is
/// saved for the open round, to write back to a store that lost it (Redis restarted empty).
#[derive(Debug, Clone)]
pub struct Durable {
    store: Store,
    updates_dir: PathBuf,
    mirror: Arc<Mutex<Mirror>>,
}

#[derive(Debug, Default)]
struct Mirror {
    round: Option<SavedRound>,
    updates: BTreeMap<String, SavedUpdate>,
}

impl Durable {
    /// With `store` durable and `data_dir` set; `None` otherwise (nothing to keep).
    pub fn new(store: &Store, data_dir: Option<&Path>) -> anyhow::Result<Option<Self>> {
        let (true, Some(data_dir)) = (store.is_durable(), data_dir) else {
            return Ok(None);
        };
        let updates_dir = data_dir.join("updates");
        std::fs::create_dir_all(&updates_dir)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", updates_dir.display()))?;
        Ok(Some(Self {
            store: store.clone(),
            updates_dir,
            mirror: Arc::default(),
        }))
    }

    fn round_dir(&self, round: u32, attempt: u32) -> PathBuf {
        self.updates_dir.join(format!("{round}-{attempt}"))
    }

    /// Saves the round being opened; the files and records of any other round go.
    pub async fn save_round(&self, saved: &SavedRound) -> anyhow::Result<()> {
        let previous = self.saved_round().await?;
        let bytes = serde_json::to_vec(saved)?;
        self.store.put(ROUND_KEY, &bytes).await?;
        {
            let mut mirror = self.mirror.lock();
            if mirror.round.as_ref() != Some(saved) {
                mirror.updates.clear();
            }
            mirror.round = Some(saved.clone());
        }
        if let Some(previous) = previous
            && (previous.round, previous.attempt) != (saved.round, saved.attempt)
        {
            self.forget_round(previous.round, previous.attempt).await;
        }
        Ok(())
    }

    pub async fn saved_round(&self) -> anyhow::Result<Option<SavedRound>> {
        match self.store.get(ROUND_KEY).await? {
            None => Ok(None),
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
                anyhow::anyhow!(
                    "the saved round in {} cannot be read: {e}",
                    self.store.description()
                )
            })?)),
        }
    }

    /// Makes an update recoverable before it is folded: its bytes written and fsynced, then its
    /// record saved. Blocking (run on the commit's own thread).
    pub fn save_update(
        &self,
        round: u32,
        attempt: u32,
        update: SavedUpdateInput<'_>,
    ) -> anyhow::Result<SavedUpdate> {
        let dir = self.round_dir(round, attempt);
        std::fs::create_dir_all(&dir)?;
        // File names from a hash of the id: participant ids come from outside.
        let name = format!(
            "{}.update",
            &sha256_hex(update.participant_id.as_bytes())[..32]
        );
        write_durably(&dir, &name, update.data)?;
        let saved = SavedUpdate {
            participant_id: update.participant_id.to_string(),
            n_samples: update.n_samples,
            metrics: update.metrics.clone(),
            sha256: sha256_hex(update.data),
            bytes: update.data.len() as u64,
            file: format!("{round}-{attempt}/{name}"),
            spec: update.spec.clone(),
        };
        let record = serde_json::to_vec(&saved)?;
        let store = self.store.clone();
        let key = accepted_key(round, attempt);
        let field = saved.participant_id.clone();
        tokio::runtime::Handle::current()
            .block_on(async move { store.hash_put(&key, &field, &record).await })?;
        self.mirror
            .lock()
            .updates
            .insert(saved.participant_id.clone(), saved.clone());
        Ok(saved)
    }

    /// Drops the record of an update that was saved but could not be folded after all.
    pub fn unsave_update(&self, round: u32, attempt: u32, saved: &SavedUpdate) {
        let store = self.store.clone();
        let key = accepted_key(round, attempt);
        let participant = saved.participant_id.clone();
        self.mirror.lock().updates.remove(&participant);
        let result = tokio::runtime::Handle::current()
            .block_on(async move { store.hash_delete(&key, &participant).await });
        if let Err(err) = result {
            tracing::warn!(%err, "the record of an update that was not folded stays");
        }
        let _ = std::fs::remove_file(self.updates_dir.join(&saved.file));
    }

    /// The saved round and the updates accepted in it, each read back and checked against its
    /// digest, in participant order.
    pub async fn load(&self) -> anyhow::Result<Option<(SavedRound, Vec<(SavedUpdate, Bytes)>)>> {
        let Some(round) = self.saved_round().await? else {
            return Ok(None);
        };
        let records = self
            .store
            .hash_get_all(&accepted_key(round.round, round.attempt))
            .await?;
        let mut updates = Vec::with_capacity(records.len());
        for (participant, record) in records {
            let saved: SavedUpdate = serde_json::from_slice(&record).map_err(|e| {
                anyhow::anyhow!("the saved update of {participant} cannot be read: {e}")
            })?;
            let path = self.updates_dir.join(&saved.file);
            let data = std::fs::read(&path).map_err(|e| {
                anyhow::anyhow!(
                    "the accepted update of {participant} in round {} is missing ({}: {e}): \
                     the data directory does not belong to this store",
                    round.round,
                    path.display()
                )
            })?;
            if sha256_hex(&data) != saved.sha256 {
                anyhow::bail!(
                    "the accepted update of {participant} in round {} ({}) is corrupted: its \
                     SHA-256 differs from the one recorded",
                    round.round,
                    path.display()
                );
            }
            updates.push((saved, Bytes::from(data)));
        }
        {
            let mut mirror = self.mirror.lock();
            mirror.round = Some(round.clone());
            mirror.updates = updates
                .iter()
                .map(|(saved, _)| (saved.participant_id.clone(), saved.clone()))
                .collect();
        }
        Ok(Some((round, updates)))
    }

    /// Forgets a round's updates (its model is stored, or it failed, or it was replaced).
    pub async fn forget_round(&self, round: u32, attempt: u32) {
        {
            let mut mirror = self.mirror.lock();
            if mirror
                .round
                .as_ref()
                .is_some_and(|r| (r.round, r.attempt) == (round, attempt))
            {
                mirror.updates.clear();
            }
        }
        if let Err(err) = self.store.delete(&accepted_key(round, attempt)).await {
            tracing::warn!(round, attempt, %err, "the round's update records stay in the store");
        }
        let dir = self.round_dir(round, attempt);
        if let Err(err) = std::fs::remove_dir_all(&dir)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(round, attempt, %err, "the round's update files stay");
        }
    }
}

/// The saved states of the rule kept: the newest two, so that a crash between a model and its
/// state still finds the state of the model it restarts from.
const STATES_KEPT: usize = 2;

impl Durable {
    fn states_dir(&self) -> PathBuf {
        self.updates_dir.with_file_name("strategy")
    }

    /// Keeps the rule's state after `round` (a server optimizer's moments), beside the model
    /// store: written, fsynced, renamed into place. Blocking.
    pub fn save_strategy_state(&self, round: u32, state: &[u8]) -> anyhow::Result<()> {
        let dir = self.states_dir();
        std::fs::create_dir_all(&dir)?;
        write_durably(&dir, &format!("round-{round:06}.state"), state)?;
        let mut kept: Vec<_> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n.starts_with("round-") && n.ends_with(".state"))
            .collect();
        kept.sort();
        for old in kept.iter().rev().skip(STATES_KEPT) {
            let _ = std::fs::remove_file(dir.join(old));
        }
        Ok(())
    }

    /// The rule's state saved after `round`, if it was.
    pub fn strategy_state(&self, round: u32) -> anyhow::Result<Option<Vec<u8>>> {
        let path = self.states_dir().join(format!("round-{round:06}.state"));
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(anyhow::anyhow!("reading {}: {err}", path.display())),
        }
    }

    /// Whether files of updates of some round are on disk: with no saved round in the store,
    /// that means the store lost what it held about them.
    pub fn has_update_files(&self) -> bool {
        std::fs::read_dir(&self.updates_dir)
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(false)
    }

    /// Checks every [`Snapshot::PROBE_EVERY`] that the store still holds the open round, and
    /// writes it back (the round and its accepted updates' records) when it does not: a Redis
    /// restarted without persistence comes back empty.
    pub async fn watch_store(self) {
        loop {
            tokio::time::sleep(Snapshot::PROBE_EVERY).await;
            let (round, updates) = {
                let mirror = self.mirror.lock();
                let Some(round) = mirror.round.clone() else {
                    continue;
                };
                (round, mirror.updates.clone())
            };
            match self.store.exists(ROUND_KEY).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(%err, "state store unreachable");
                    continue;
                }
            }
            // The records first: a restart that finds the round finds its updates too.
            let written = async {
                let key = accepted_key(round.round, round.attempt);
                for (participant, saved) in &updates {
                    self.store
                        .hash_put(&key, participant, &serde_json::to_vec(saved)?)
                        .await?;
                }
                self.store
                    .put(ROUND_KEY, &serde_json::to_vec(&round)?)
                    .await?;
                anyhow::Ok(())
            };
            match written.await {
                Ok(()) => tracing::warn!(
                    store = %self.store.description(),
                    round = round.round,
                    updates = updates.len(),
                    "the state store had lost the open round; written back"
                ),
                Err(err) => tracing::warn!(%err, "writing the open round back failed; retrying"),
            }
        }
    }
}

/// What [`Durable::save_update`] saves.
pub struct SavedUpdateInput<'a> {
    pub participant_id: &'a str,
    pub data: &'a [u8],
    pub n_samples: u64,
    pub metrics: &'a BTreeMap<String, f64>,
    pub spec: &'a ModelSpec,
}
