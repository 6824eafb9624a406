//! The model store (`[store]`): every global model the aggregator makes is kept on disk with a
//! manifest that says where it came from, so that a round the coordinator counts is never lost
//! and any kept round can be downloaded again, by anyone, long after it was replaced.
//!
//! Layout, under `store.data_dir/models/`: `round-000007.safetensors`, the very bytes served
//! for round 7 (header with `rondo.round` and all, so `model.initial_model` can name it), and
//! `round-000007.json`, its [`Manifest`] (contributors, SHA-256, length, when, which rule).
//!
//! Durability: each file is written to a hidden temp file in the same directory, fsynced,
//! renamed into place, and the directory fsynced; the manifest only once its model is in
//! place, and the old manifest of a round written again is removed first. So a manifest on
//! disk always names a complete file, whatever moment a crash picks. The service writes a
//! round's model before the coordinator hears the round was aggregated
//! ([`crate::service::Aggregator::close_round_blocking`]).
//!
//! One history: round numbers are the keys. A round aggregated here supersedes the stored
//! rounds after it (they belong to a history the coordinator is re-running, after the
//! aggregator lost them), so that [`ModelStore::latest`] is always the model last made. The
//! initial model, stored at start-up as round 0, supersedes nothing: restarting an aggregator
//! on a store keeps what it holds. With `keep_models > 0` only that many rounds, the newest,
//! are kept.
//!
//! Reads check the file against its manifest's SHA-256 and length and refuse a file that does
//! not match. Readers never pair a manifest with another write's file: a round being written
//! again leaves the index (under its lock) before its file is replaced, and readers open the
//! file under that lock, so they hold the old inode or see no entry.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The directory under `store.data_dir` that holds the models.
const MODELS_DIR: &str = "models";
/// Manifests larger than this are not ours (a real one is a few KB per thousand contributors).
const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// How a stored model came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A round's aggregation made it.
    Aggregated,
    /// `model.initial_model`, loaded at start-up: the model of round 0.
    InitialModel,
}

/// What the store says about one kept model (`round-000007.json`, and `GET /v1/models`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub round: u32,
    pub attempt: u32,
    pub source: Source,
    /// The aggregation rule that made it (`fedavg` for round 0, which is always a plain
    /// average); absent for an initial model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Every participant whose update is in the model → its `n_samples`.
    pub contributors: BTreeMap<String, u64>,
    pub total_samples: u64,
    /// Sample-weighted means of the training metrics, when the aggregator has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_metrics: Option<BTreeMap<String, f64>>,
    /// The model file's name, in the same directory.
    pub file: String,
    /// SHA-256 of the whole file, lowercase hex.
    pub sha256: String,
    pub bytes: u64,
    /// When the model was written (RFC 3339, UTC).
    pub written_at: String,
    /// The version of the aggregator that wrote it.
    pub rondo_version: String,
}

/// A model to store: [`ModelStore::store`]'s argument.
#[derive(Debug, Clone, Copy)]
pub struct NewModel<'a> {
    pub round: u32,
    pub attempt: u32,
    pub source: Source,
    pub strategy: Option<&'a str>,
    pub contributors: &'a BTreeMap<String, u64>,
    pub training_metrics: Option<&'a BTreeMap<String, f64>>,
    /// The whole model file, as served.
    pub file: &'a [u8],
}

/// Why a kept model could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("stored model {path} does not match its manifest: {problem}")]
    Corrupted { path: String, problem: String },
    #[error("reading stored model {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The last failed write, for the status.
#[derive(Debug, Clone, Serialize)]
pub struct StoreFailure {
    pub round: u32,
    pub message: String,
    pub at: String,
}

#[derive(Debug)]
pub struct ModelStore {
    dir: PathBuf,
    keep: usize,
    /// round → its manifest: what is on disk and complete.
    index: Mutex<BTreeMap<u32, Manifest>>,
    /// One write at a time (closes are serial anyway; start-up writes round 0).
    writing: Mutex<()>,
    /// One cache miss at a time, so that many downloads of one round read it once.
    reading: Mutex<()>,
    /// The file read last, checked: downloads of the same round share it.
    cached: Mutex<Option<(u32, String, Bytes)>>,
    last_failure: Mutex<Option<StoreFailure>>,
}

/// `data_dir` can hold the store: created if missing, and writable (a file is created and
/// removed there). The message says what is wrong, for the config error naming the key.
pub fn check_data_dir(data_dir: &Path) -> Result<(), String> {
    let dir = data_dir.join(MODELS_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let probe = dir.join(format!(".write-probe-{}", std::process::id()));
    File::create(&probe)
        .and_then(|mut f| f.write_all(b"rondo"))
        .map_err(|e| format!("{} is not writable: {e}", dir.display()))?;
    std::fs::remove_file(&probe)
        .map_err(|e| format!("cannot remove {} again: {e}", probe.display()))?;
    Ok(())
}

fn model_name(round: u32) -> String {
    format!("round-{round:06}.safetensors")
}

fn manifest_name(round: u32) -> String {
    format!("round-{round:06}.json")
}

/// The round of a file name the store writes (`round-000007.json` → 7), for either suffix.
fn round_of(name: &str, suffix: &str) -> Option<u32> {
    let digits = name.strip_prefix("round-")?.strip_suffix(suffix)?;
    (digits.len() >= 6 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `data` as `dir/name`: a temp file in `dir`, fsynced, renamed over `name`, and `dir`
/// fsynced, so that the name holds the old bytes or all the new ones, also after a crash.
pub(crate) fn write_durably(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let written = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, dir.join(name))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir)
}

fn remove_if_present(path: &Path) -> std::io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

impl ModelStore {
    /// Opens (creating it if needed) the store under `data_dir`, keeping the last `keep`
    /// rounds (0: all). What it finds on disk is listed: each manifest that parses and names a
    /// file of its length. Leftovers of a write a crash interrupted (temp files, a model whose
    /// manifest never came) are removed; a manifest that does not describe its file is left
    /// on disk, unlisted, with a warning.
    pub fn open(data_dir: &Path, keep: usize) -> anyhow::Result<Self> {
        check_data_dir(data_dir).map_err(anyhow::Error::msg)?;
        let dir = data_dir.join(MODELS_DIR);
        let mut index = BTreeMap::new();
        let mut models = Vec::new();
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(".round-") && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            } else if let Some(round) = round_of(name, ".safetensors") {
                models.push(round);
            } else if let Some(round) = round_of(name, ".json") {
                match Self::read_manifest(&dir, round) {
                    Ok(manifest) => {
                        index.insert(round, manifest);
                    }
                    Err(err) => tracing::warn!(
                        path = %entry.path().display(),
                        "not listing a stored model: {err:#}"
                    ),
                }
            }
        }
        for round in models {
            if !index.contains_key(&round) && !dir.join(manifest_name(round)).exists() {
                tracing::info!(
                    round,
                    "removing a stored model whose manifest was never written"
                );
                let _ = std::fs::remove_file(dir.join(model_name(round)));
            }
        }
        tracing::info!(
            dir = %dir.display(),
            models = index.len(),
            latest = ?index.keys().next_back(),
            keep,
            "model store opened"
        );
        Ok(Self {
            dir,
            keep,
            index: Mutex::new(index),
            writing: Mutex::new(()),
            reading: Mutex::new(()),
            cached: Mutex::new(None),
            last_failure: Mutex::new(None),
        })
    }

    fn read_manifest(dir: &Path, round: u32) -> anyhow::Result<Manifest> {
        let path = dir.join(manifest_name(round));
        let mut text = Vec::new();
        File::open(&path)?
            .take(MAX_MANIFEST_BYTES)
            .read_to_end(&mut text)?;
        let manifest: Manifest = serde_json::from_slice(&text).context("not a manifest")?;
        if manifest.round != round || manifest.file != model_name(round) {
            anyhow::bail!(
                "it describes round {} ({}), not round {round}",
                manifest.round,
                manifest.file
            );
        }
        let len = std::fs::metadata(dir.join(&manifest.file))
            .with_context(|| format!("its model {}", manifest.file))?
            .len();
        if len != manifest.bytes {
            anyhow::bail!(
                "its model {} holds {len} bytes, not the {} it names",
                manifest.file,
                manifest.bytes
            );
        }
        Ok(manifest)
    }

    /// `data_dir/models`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn keep(&self) -> usize {
        self.keep
    }

    /// Writes `model` and its manifest durably (see the module doc), then drops the rounds it
    /// supersedes and those beyond `keep`. On failure the round is not listed, and the failure
    /// is kept for the status ([`ModelStore::last_failure`]); `Ok` means both files are in
    /// place and synced (a round that could not be dropped afterwards is only logged).
    pub fn store(&self, model: &NewModel<'_>) -> anyhow::Result<Manifest> {
        let stored = self.write(model);
        if let Err(err) = &stored {
            *self.last_failure.lock() = Some(StoreFailure {
                round: model.round,
                message: format!("{err:#}"),
                at: now_rfc3339(),
            });
        }
        stored
    }

    fn write(&self, model: &NewModel<'_>) -> anyhow::Result<Manifest> {
        let _writing = self.writing.lock();
        let round = model.round;
        let manifest = Manifest {
            round,
            attempt: model.attempt,
            source: model.source,
            strategy: model.strategy.map(str::to_string),
            contributors: model.contributors.clone(),
            total_samples: model
                .contributors
                .values()
                .fold(0u64, |sum, n| sum.saturating_add(*n)),
            training_metrics: model.training_metrics.cloned(),
            file: model_name(round),
            sha256: sha256_hex(model.file),
            bytes: model.file.len() as u64,
            written_at: String::new(),
            rondo_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        // A round written again: its old manifest goes first (also one left unlisted), so
        // that no reader and no crash pairs it with the new file.
        self.unlist(round);
        let old_manifest = self.dir.join(manifest_name(round));
        if remove_if_present(&old_manifest)
            .with_context(|| format!("removing {}", old_manifest.display()))?
        {
            sync_dir(&self.dir).with_context(|| format!("syncing {}", self.dir.display()))?;
        }
        write_durably(&self.dir, &manifest.file, model.file)
            .with_context(|| format!("writing {}", self.dir.join(&manifest.file).display()))?;
        let manifest = Manifest {
            written_at: now_rfc3339(),
            ..manifest
        };
        let text = serde_json::to_vec_pretty(&manifest).context("serializing the manifest")?;
        write_durably(&self.dir, &manifest_name(round), &text).with_context(|| {
            format!("writing {}", self.dir.join(manifest_name(round)).display())
        })?;
        self.index.lock().insert(round, manifest.clone());
        let superseded: Vec<u32> = match model.source {
            Source::Aggregated => self
                .index
                .lock()
                .range(round + 1..)
                .map(|(r, _)| *r)
                .collect(),
            Source::InitialModel => Vec::new(),
        };
        if !superseded.is_empty() {
            tracing::warn!(
                round,
                ?superseded,
                "dropping stored rounds after this one: they belong to the history the \
                 federation is running again"
            );
        }
        let beyond_keep: Vec<u32> = {
            let index = self.index.lock();
            let left = index.len() - superseded.len();
            let excess = if self.keep > 0 {
                left.saturating_sub(self.keep)
            } else {
                0
            };
            index
                .keys()
                .filter(|r| !superseded.contains(r))
                .take(excess)
                .copied()
                .collect()
        };
        // The model is durable by now: a pair that cannot be deleted is left (and listed no
        // more), not a reason to fail the round.
        if let Err(err) = self.remove_rounds(superseded.iter().chain(&beyond_keep)) {
            tracing::warn!(round, "could not delete older stored rounds: {err}");
        }
        tracing::info!(
            round,
            bytes = manifest.bytes,
            sha256 = %manifest.sha256,
            "global model stored"
        );
        Ok(manifest)
    }

    /// Takes `round` out of the index (and the cache).
    fn unlist(&self, round: u32) {
        // Locks in the one order: index, then cache.
        let mut index = self.index.lock();
        let mut cached = self.cached.lock();
        if cached.as_ref().is_some_and(|(r, _, _)| *r == round) {
            *cached = None;
        }
        index.remove(&round);
    }

    /// Removes rounds' pairs: each leaves the index first, then its manifest, then its model,
    /// so that what is listed, and every manifest on disk, names a file that is there.
    fn remove_rounds<'a>(&self, rounds: impl Iterator<Item = &'a u32>) -> std::io::Result<()> {
        let mut removed = false;
        for &round in rounds {
            self.unlist(round);
            remove_if_present(&self.dir.join(manifest_name(round)))?;
            remove_if_present(&self.dir.join(model_name(round)))?;
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Every kept model's manifest, by round.
    pub fn manifests(&self) -> Vec<Manifest> {
        self.index.lock().values().cloned().collect()
    }

    /// How many rounds are kept.
    pub fn count(&self) -> usize {
        self.index.lock().len()
    }

    /// The manifest of the newest kept round.
    pub fn latest(&self) -> Option<Manifest> {
        self.index.lock().values().next_back().cloned()
    }

    pub fn manifest(&self, round: u32) -> Option<Manifest> {
        self.index.lock().get(&round).cloned()
    }

    pub fn last_failure(&self) -> Option<StoreFailure> {
        self.last_failure.lock().clone()
    }

    /// A kept round's manifest and file, the file checked against the manifest (length and
    /// SHA-256): a file that does not match is refused, never served. `None`: not kept.
    /// Blocking (it reads and hashes the whole file), run it off the async threads.
    pub fn read(&self, round: u32) -> Result<Option<(Manifest, Bytes)>, ReadError> {
        if let Some(hit) = self.cache_hit(round) {
            return Ok(Some(hit));
        }
        let _reading = self.reading.lock();
        if let Some(hit) = self.cache_hit(round) {
            return Ok(Some(hit));
        }
        let path = self.dir.join(model_name(round));
        let shown = path.display().to_string();
        let io = |source| ReadError::Io {
            path: shown.clone(),
            source,
        };
        // Opened under the index's lock: a write of this round unlists it before replacing
        // the file, so this file is the one the manifest describes (see the module doc).
        let (manifest, file) = {
            let index = self.index.lock();
            let Some(manifest) = index.get(&round).cloned() else {
                return Ok(None);
            };
            (manifest, File::open(&path).map_err(io)?)
        };
        let mut data = Vec::with_capacity(usize::try_from(manifest.bytes).unwrap_or(0));
        // One byte past the manifest's length is enough to see the file is longer.
        file.take(manifest.bytes.saturating_add(1))
            .read_to_end(&mut data)
            .map_err(io)?;
        let corrupted = |problem: String| ReadError::Corrupted {
            path: shown.clone(),
            problem,
        };
        if data.len() as u64 != manifest.bytes {
            return Err(corrupted(format!(
                "it holds {}{} bytes, the manifest says {}",
                if data.len() as u64 > manifest.bytes {
                    "more than "
                } else {
                    ""
                },
                data.len()
                    .min(usize::try_from(manifest.bytes).unwrap_or(usize::MAX)),
                manifest.bytes
            )));
        }
        let sha256 = sha256_hex(&data);
        if sha256 != manifest.sha256 {
            return Err(corrupted(format!(
                "its SHA-256 is {sha256}, the manifest says {}",
                manifest.sha256
            )));
        }
        let data = Bytes::from(data);
        // Locks in the one order: index, then cache.
        let index = self.index.lock();
        // Still listed as read: a write that began meanwhile must not find its old bytes here.
        if index.get(&round).is_some_and(|m| m.sha256 == sha256) {
            *self.cached.lock() = Some((round, sha256, data.clone()));
        }
        drop(index);
        Ok(Some((manifest, data)))
    }

    fn cache_hit(&self, round: u32) -> Option<(Manifest, Bytes)> {
        let index = self.index.lock();
        let cached = self.cached.lock();
        let (_, sha256, data) = cached.as_ref().filter(|(r, _, _)| *r == round)?;
        let manifest = index.get(&round).filter(|m| m.sha256 == *sha256)?;
        Some((manifest.clone(), data.clone()))
    }
}

/// The store `[store]` configures, if any, opened at start-up, with the initial model (when
/// `model.initial_model` gave one) kept as round 0. A store that cannot be opened is a config
/// error (exit code 2, naming `store.data_dir`).
pub fn open_configured(
    settings: &crate::config::StoreSettings,
    book: &crate::rounds::RoundBook,
) -> anyhow::Result<Option<Arc<ModelStore>>> {
    let Some(data_dir) = &settings.data_dir else {
        return Ok(None);
    };
    let keep = usize::try_from(settings.keep_models).unwrap_or(usize::MAX);
    let store = ModelStore::open(data_dir, keep).map_err(|err| {
        rondo_net::settings::ConfigError::invalid(
            "store.data_dir",
            format!("{:?}", data_dir.display().to_string()),
            format!("cannot hold the model store: {err:#}"),
        )
    })?;
    if let Some(model) = book.model() {
        let none = BTreeMap::new();
        store
            .store(&NewModel {
                round: model.round,
                attempt: 0,
                source: Source::InitialModel,
                strategy: None,
                contributors: &none,
                training_metrics: None,
                file: &model.file,
            })
            .with_context(|| {
                format!(
                    "store.data_dir {}: keeping the initial model as round {}",
                    data_dir.display(),
                    model.round
                )
            })?;
    }
    Ok(Some(Arc::new(store)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire;
    use rondo_core::kernels::encode_values;
    use rondo_core::model::{DType, ModelSpec, TensorSpec};

    fn spec() -> ModelSpec {
        ModelSpec {
            tensors: vec![
                TensorSpec {
                    name: "layer/w".into(),
                    dtype: DType::F32,
                    shape: vec![2, 3],
                },
                TensorSpec {
                    name: "layer/b".into(),
                    dtype: DType::F32,
                    shape: vec![3],
                },
            ],
        }
    }

    /// A model file as the aggregator serves it for `round`: every value `value`.
    fn served_file(round: u32, value: f64) -> Vec<u8> {
        let spec = spec();
        let data = encode_values(DType::F32, &vec![value; spec.element_count()]);
        wire::model_file(&wire::model_header(&spec, round), &data).to_vec()
    }

    fn contributors() -> BTreeMap<String, u64> {
        BTreeMap::from([("alice".to_string(), 10), ("bob".to_string(), 30)])
    }

    fn store_round(store: &ModelStore, round: u32, file: &[u8]) -> Manifest {
        let contributors = contributors();
        store
            .store(&NewModel {
                round,
                attempt: 1,
                source: Source::Aggregated,
                strategy: Some("fedavg"),
                contributors: &contributors,
                training_metrics: None,
                file,
            })
            .expect("stored")
    }

    fn files_in(store: &ModelStore) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_stored_model_comes_back_whole_with_its_manifest_also_after_reopening() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ModelStore::open(tmp.path(), 0).unwrap();
        assert!(store.latest().is_none());
        let file = served_file(7, 1.5);
        let manifest = store_round(&store, 7, &file);
        assert_eq!(manifest.round, 7);
        assert_eq!(manifest.attempt, 1);
        assert_eq!(manifest.source, Source::Aggregated);
        assert_eq!(manifest.strategy.as_deref(), Some("fedavg"));
        assert_eq!(manifest.contributors, contributors());
        assert_eq!(manifest.total_samples, 40);
        assert_eq!(manifest.training_metrics, None);
        assert_eq!(manifest.file, "round-000007.safetensors");
        assert_eq!(manifest.sha256, sha256_hex(&file));
        assert_eq!(manifest.sha256.len(), 64);
        assert_eq!(manifest.bytes, file.len() as u64);
        assert_eq!(manifest.rondo_version, env!("CARGO_PKG_VERSION"));
        let written = humantime::parse_rfc3339(&manifest.written_at).expect("RFC 3339");
        assert!(
            manifest.written_at.ends_with('Z'),
            "UTC: {}",
            manifest.written_at
        );
        assert!(SystemTime::now().duration_since(written).unwrap().as_secs() < 60);

        let (read, bytes) = store.read(7).unwrap().expect("kept");
        assert_eq!((read, &bytes[..]), (manifest.clone(), &file[..]));
        assert!(store.read(6).unwrap().is_none());
        assert_eq!(
            files_in(&store),
            ["round-000007.json", "round-000007.safetensors"]
        );
        // The manifest on disk is the one returned, and training metrics are left out.
        let on_disk: serde_json::Value =
            serde_json::from_slice(&std::fs::read(store.dir().join("round-000007.json")).unwrap())
                .unwrap();
        assert_eq!(
            serde_json::from_value::<Manifest>(on_disk.clone()).unwrap(),
            manifest
        );
        assert!(on_disk.get("training_metrics").is_none());

        drop(store);
        let reopened = ModelStore::open(tmp.path(), 0).unwrap();
        assert_eq!(reopened.manifests(), vec![manifest.clone()]);
        assert_eq!(reopened.read(7).unwrap().expect("kept").1, file);
    }

    #[test]
    fn a_corrupted_file_is_refused_not_served() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ModelStore::open(tmp.path(), 0).unwrap();
        let file = served_file(3, 2.0);
        store_round(&store, 3, &file);
        let path = store.dir().join("round-000003.safetensors");
        let mut flipped = file.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        let err = store.read(3).expect_err("a flipped bit is refused");
        assert!(matches!(err, ReadError::Corrupted { .. }), "{err}");
        assert!(err.to_string().contains("SHA-256"), "{err}");
        std::fs::write(&path, &file[..file.len() - 4]).unwrap();
        let err = store.read(3).expect_err("a short file is refused");
        assert!(err.to_string().contains("the manifest says"), "{err}");
        // Once refused, never cached: the good file is read again when it is back.
        std::fs::write(&path, &file).unwrap();
        assert_eq!(store.read(3).unwrap().expect("kept").1, file);
    }

    #[test]
    fn a_cached_read_still_follows_a_round_written_again() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ModelStore::open(tmp.path(), 0).unwrap();
        store_round(&store, 2, &served_file(2, 1.0));
        assert_eq!(store.read(2).unwrap().unwrap().1, served_file(2, 1.0));
        let again = store_round(&store, 2, &served_file(2, 9.0));
        let (manifest, bytes) = store.read(2).unwrap().unwrap();
        assert_eq!((manifest, &bytes[..]), (again, &served_file(2, 9.0)[..]));
    }

    #[test]
    fn only_the_last_keep_models_rounds_are_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ModelStore::open(tmp.path(), 2).unwrap();
        for round in 0..5 {
            store_round(&store, round, &served_file(round, f64::from(round)));
        }
        let rounds: Vec<u32> = store.manifests().iter().map(|m| m.round).collect();
        assert_eq!(rounds, [3, 4]);
        assert_eq!(store.latest().map(|m| m.round), Some(4));
        assert_eq!(
            files_in(&store),
            [
                "round-000003.json",
                "round-000003.safetensors",
                "round-000004.json",
                "round-000004.safetensors"
            ]
        );
        assert!(store.read(1).unwrap().is_none());
    }

    #[test]
    fn a_round_aggregated_again_supersedes_the_later_ones_and_an_initial_model_does_not() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ModelStore::open(tmp.path(), 0).unwrap();
        for round in 0..4 {
            store_round(&store, round, &served_file(round, 1.0));
        }
        let none = BTreeMap::new();
        store
            .store(&NewModel {
                round: 0,
                attempt: 0,
                source: Source::InitialModel,
                strategy: None,
                contributors: &none,
                training_metrics: None,
                file: &served_file(0, 5.0),
            })
            .unwrap();
        let rounds: Vec<u32> = store.manifests().iter().map(|m| m.round).collect();
        assert_eq!(rounds, [0, 1, 2, 3], "restarting on a store keeps it");
        let initial = store.manifest(0).unwrap();
        assert_eq!(
            (initial.source, initial.strategy),
            (Source::InitialModel, None)
        );
        assert_eq!(initial.total_samples, 0);
        store_round(&store, 1, &served_file(1, 7.0));
        let rounds: Vec<u32> = store.manifests().iter().map(|m| m.round).collect();
        assert_eq!(rounds, [0, 1]);
        assert_eq!(
            store.latest().unwrap().sha256,
            sha256_hex(&served_file(1, 7.0))
        );
        assert_eq!(
            files_in(&store),
            [
                "round-000000.json",
                "round-000000.safetensors",
                "round-000001.json",
                "round-000001.safetensors"
            ]
        );
    }

    #[test]
    fn opening_lists_only_complete_pairs_and_clears_interrupted_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ModelStore::open(tmp.path(), 0).unwrap();
        store_round(&store, 1, &served_file(1, 1.0));
        store_round(&store, 2, &served_file(2, 1.0));
        let dir = store.dir().to_path_buf();
        drop(store);
        // A crash mid-write of round 3's model, one after round 4's model, a manifest whose
        // model was truncated, and files that are not the store's.
        std::fs::write(dir.join(".round-000003.safetensors.tmp"), b"half").unwrap();
        std::fs::write(dir.join("round-000004.safetensors"), served_file(4, 1.0)).unwrap();
        let truncated = std::fs::read(dir.join("round-000002.safetensors")).unwrap();
        std::fs::write(dir.join("round-000002.safetensors"), &truncated[..10]).unwrap();
        std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
        std::fs::write(dir.join("round-000009.json"), b"{not json").unwrap();

        let store = ModelStore::open(tmp.path(), 0).unwrap();
        let rounds: Vec<u32> = store.manifests().iter().map(|m| m.round).collect();
        assert_eq!(rounds, [1]);
        assert_eq!(
            files_in(&store),
            [
                "notes.txt",
                "round-000001.json",
                "round-000001.safetensors",
                "round-000002.json",
                "round-000002.safetensors",
                "round-000009.json"
            ]
        );
    }

    #[test]
    fn the_data_dir_must_be_a_writable_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let nested = tmp.path().join("a/b");
        check_data_dir(&nested).expect("created with its parents");
        assert!(nested.join("models").is_dir());
        assert_eq!(std::fs::read_dir(nested.join("models")).unwrap().count(), 0);
        let file = tmp.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let err = check_data_dir(&file).expect_err("a file is no directory");
        assert!(err.contains("cannot create"), "{err}");
        let err = ModelStore::open(&file.join("below"), 0).expect_err("nor is below it");
        assert!(err.to_string().contains("cannot create"), "{err}");
    }

    #[test]
    fn a_stored_model_loads_as_an_initial_model_with_the_same_tensors() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ModelStore::open(tmp.path(), 0).unwrap();
        let file = served_file(12, 0.25);
        store_round(&store, 12, &file);
        let path = store.dir().join("round-000012.safetensors");
        let (spec, loaded) =
            wire::load_model_file(std::io::BufReader::new(File::open(&path).unwrap()))
                .expect("the store's file (rondo.round metadata, padded header) loads");
        assert_eq!(spec, super::tests::spec());
        let header_len = 8 + u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
        assert_eq!(loaded.data(), &file[header_len..]);
        // Loaded, it is round 0's model: the same tensors under round 0's header.
        let served = loaded.as_ref();
        assert_eq!(
            &served[..served.len() - loaded.data().len()],
            &wire::model_header(&spec, 0)[..]
        );
    }
}
