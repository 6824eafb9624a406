//! The state store: where each service keeps what it needs to carry on after it is killed.
//!
//! One seam, two backends. [`Store::memory`] is the default (nothing to install): state lives
//! and dies with the process, exactly as if there were no store. [`Store::redis`] keeps it in
//! Redis, through a [`redis::aio::ConnectionManager`] that reconnects by itself after Redis or
//! the network comes back. Keys are namespaced (`rondo:<namespace>:…`) so that several
//! federations can share one Redis.
//!
//! Only small records go here (participants, rounds, accepted-update records). Model-sized
//! bytes go to files under `store.data_dir` and the store holds their names and digests.
//!
//! [`Snapshot`] is the one way a service persists a record that changes often: callers mark
//! it changed, and a writer task saves the newest version, coalescing many changes into one
//! write (group commit). [`Snapshot::durable`] waits until a version taken after the call is
//! saved, for changes that must survive a crash before they are acknowledged; [`Snapshot::touch`]
//! only asks for a save soon. The writer also notices a Redis that came back empty (restarted
//! without persistence) and writes the record back.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use redis::AsyncCommands;
use tokio::sync::{Notify, watch};

use crate::retry::Backoff;
use crate::settings::ConfigError;
use crate::shutdown::Shutdown;

/// A store operation that failed: Redis unreachable, or an answer that makes no sense.
#[derive(Debug, thiserror::Error)]
#[error("state store {store}: {message}")]
pub struct StoreError {
    store: String,
    message: String,
}

/// Where a service keeps its state; cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    prefix: String,
    /// What the store is, for messages: `memory`, or the Redis URL without its password.
    description: String,
}

#[derive(Clone)]
enum Backend {
    Memory(Arc<Mutex<MemoryData>>),
    Redis(redis::aio::ConnectionManager),
}

#[derive(Default)]
struct MemoryData {
    values: HashMap<String, Vec<u8>>,
    hashes: HashMap<String, BTreeMap<String, Vec<u8>>>,
}

/// How long one Redis call may take before it counts as failed (and is retried by the caller).
const REDIS_CALL_TIMEOUT: Duration = Duration::from_secs(5);

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

impl Store {
    /// The in-memory store: nothing survives the process.
    pub fn memory(namespace: &str) -> Self {
        Self {
            backend: Backend::Memory(Arc::default()),
            prefix: format!("rondo:{namespace}:"),
            description: "memory".to_string(),
        }
    }

    /// A Redis store at `url` (`redis://host:port/db`). Waits up to `connect_within` for Redis
    /// to answer, so that services started together with Redis do not fail for being first.
    pub async fn redis(
        url: &str,
        namespace: &str,
        connect_within: Duration,
    ) -> Result<Self, StoreError> {
        let description = redacted(url);
        let error = |message: String| StoreError {
            store: description.clone(),
            message,
        };
        let client = redis::Client::open(url).map_err(|e| error(format!("bad URL: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(REDIS_CALL_TIMEOUT));
        let started = tokio::time::Instant::now();
        let mut backoff = Backoff::link();
        let manager = loop {
            match redis::aio::ConnectionManager::new_with_config(client.clone(), config.clone())
                .await
            {
                Ok(manager) => break manager,
                Err(err) if started.elapsed() < connect_within => {
                    tracing::warn!(store = %description, %err, "state store unreachable; retrying");
                    backoff.wait().await;
                }
                Err(err) => return Err(error(format!("unreachable: {err}"))),
            }
        };
        Ok(Self {
            backend: Backend::Redis(manager),
            prefix: format!("rondo:{namespace}:"),
            description,
        })
    }

    /// Whether what is saved here outlives the process.
    pub fn is_durable(&self) -> bool {
        matches!(self.backend, Backend::Redis(_))
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn failed(&self, err: impl std::fmt::Display) -> StoreError {
        StoreError {
            store: self.description.clone(),
            message: err.to_string(),
        }
    }

    pub async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.key(name);
        match &self.backend {
            Backend::Memory(data) => Ok(data.lock().values.get(&key).cloned()),
            Backend::Redis(manager) => {
                let mut connection = manager.clone();
                connection.get(key).await.map_err(|e| self.failed(e))
            }
        }
    }

    pub async fn put(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let key = self.key(name);
        match &self.backend {
            Backend::Memory(data) => {
                data.lock().values.insert(key, value.to_vec());
                Ok(())
            }
            Backend::Redis(manager) => {
                let mut connection = manager.clone();
                connection
                    .set::<_, _, ()>(key, value)
                    .await
                    .map_err(|e| self.failed(e))
            }
        }
    }

    /// Removes a value or a hash.
    pub async fn delete(&self, name: &str) -> Result<(), StoreError> {
        let key = self.key(name);
        match &self.backend {
            Backend::Memory(data) => {
                let mut data = data.lock();
                data.values.remove(&key);
                data.hashes.remove(&key);
                Ok(())
            }
            Backend::Redis(manager) => {
                let mut connection = manager.clone();
                connection
                    .del::<_, ()>(key)
                    .await
                    .map_err(|e| self.failed(e))
            }
        }
    }

    pub async fn exists(&self, name: &str) -> Result<bool, StoreError> {
        let key = self.key(name);
        match &self.backend {
            Backend::Memory(data) => {
                let data = data.lock();
                Ok(data.values.contains_key(&key) || data.hashes.contains_key(&key))
            }
            Backend::Redis(manager) => {
                let mut connection = manager.clone();
                connection.exists(key).await.map_err(|e| self.failed(e))
            }
        }
    }

    /// Sets one field of a hash.
    pub async fn hash_put(&self, name: &str, field: &str, value: &[u8]) -> Result<(), StoreError> {
        let key = self.key(name);
        match &self.backend {
            Backend::Memory(data) => {
                data.lock()
                    .hashes
                    .entry(key)
                    .or_default()
                    .insert(field.to_string(), value.to_vec());
                Ok(())
            }
            Backend::Redis(manager) => {
                let mut connection = manager.clone();
                connection
                    .hset::<_, _, _, ()>(key, field, value)
                    .await
                    .map_err(|e| self.failed(e))
            }
        }
    }

    /// Removes one field of a hash.
    pub async fn hash_delete(&self, name: &str, field: &str) -> Result<(), StoreError> {
        let key = self.key(name);
        match &self.backend {
            Backend::Memory(data) => {
                if let Some(hash) = data.lock().hashes.get_mut(&key) {
                    hash.remove(field);
                }
                Ok(())
            }
            Backend::Redis(manager) => {
                let mut connection = manager.clone();
                connection
                    .hdel::<_, _, ()>(key, field)
                    .await
                    .map_err(|e| self.failed(e))
            }
        }
    }

    /// Every field of a hash (empty when there is none).
    pub async fn hash_get_all(&self, name: &str) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
        let key = self.key(name);
        match &self.backend {
            Backend::Memory(data) => Ok(data.lock().hashes.get(&key).cloned().unwrap_or_default()),
            Backend::Redis(manager) => {
                let mut connection = manager.clone();
                let fields: HashMap<String, Vec<u8>> =
                    connection.hgetall(key).await.map_err(|e| self.failed(e))?;
                Ok(fields.into_iter().collect())
            }
        }
    }
}

/// The `[store]` keys both services share, checked: what [`StoreSettings::open`] connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// `redis://host:port/db`; `None`: the in-memory store.
    pub url: Option<String>,
    /// Keeps the keys of federations that share one Redis apart.
    pub namespace: String,
    /// Where model-sized bytes and the service's marker go; `None`: nowhere.
    pub data_dir: Option<std::path::PathBuf>,
}

impl StoreSettings {
    /// Checks `store.url`, `store.namespace` and `store.data_dir` (created when missing).
    pub fn new(url: &str, namespace: &str, data_dir: &str) -> Result<Self, ConfigError> {
        let url = match url.trim() {
            "" => None,
            url if url.starts_with("redis://") && url.len() > "redis://".len() => {
                redis::Client::open(url).map_err(|e| {
                    ConfigError::invalid("store.url", format!("{:?}", redacted(url)), e)
                })?;
                Some(url.to_string())
            }
            other => {
                return Err(ConfigError::invalid(
                    "store.url",
                    format!("{:?}", redacted(other)),
                    "must be empty (the in-memory store) or a redis://host:port/db URL",
                ));
            }
        };
        let namespace_ok = !namespace.is_empty()
            && namespace.len() <= 64
            && namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !namespace_ok {
            return Err(ConfigError::invalid(
                "store.namespace",
                format!("{namespace:?}"),
                "must be 1 to 64 letters, digits, '-', '_' or '.'",
            ));
        }
        let data_dir = match data_dir.trim() {
            "" => None,
            dir => {
                let path = std::path::PathBuf::from(dir);
                std::fs::create_dir_all(&path)
                    .map_err(|e| ConfigError::invalid("store.data_dir", format!("{dir:?}"), e))?;
                Some(path)
            }
        };
        Ok(Self {
            url,
            namespace: namespace.to_string(),
            data_dir,
        })
    }

    /// Connects to the configured store (waiting a while for Redis to come up).
    pub async fn open(&self) -> Result<Store, StoreError> {
        match &self.url {
            None => Ok(Store::memory(&self.namespace)),
            Some(url) => Store::redis(url, &self.namespace, Duration::from_secs(30)).await,
        }
    }
}

/// `url` without the password it may carry, for logs and messages.
fn redacted(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// A record saved under one key of a [`Store`], rewritten whole whenever it changed: the
/// coordinator's federation, for one. See the module documentation.
pub struct Snapshot {
    /// Bumped by every change; the writer saves the version it read.
    wanted: AtomicU64,
    /// The newest version saved.
    saved: watch::Sender<u64>,
    /// Changes that must be saved now rather than within [`Snapshot::SOFT_DELAY`].
    urgent: AtomicU64,
    wake: Notify,
}

/// What the writer saves: the record's bytes, taken when it asks.
pub type Render = Box<dyn Fn() -> Result<Vec<u8>, String> + Send + Sync>;

impl Snapshot {
    /// How long a change that did not ask for durability may wait to be saved, so that a
    /// stream of small changes (heartbeats) costs at most one write per this period.
    pub const SOFT_DELAY: Duration = Duration::from_secs(1);
    /// How often the writer checks that the store still holds the record.
    pub const PROBE_EVERY: Duration = Duration::from_secs(1);

    /// Starts the writer of `name` in `store`, which saves what `render` returns. With a
    /// store that is not durable nothing is written and [`Snapshot::durable`] returns at once.
    pub fn start(store: Store, name: &str, render: Render, shutdown: &Shutdown) -> Arc<Self> {
        let snapshot = Arc::new(Self {
            wanted: AtomicU64::new(0),
            saved: watch::Sender::new(0),
            urgent: AtomicU64::new(0),
            wake: Notify::new(),
        });
        if store.is_durable() {
            let writer = snapshot.clone();
            let name = name.to_string();
            let stop = shutdown.signalled();
            shutdown.spawn(async move {
                tokio::select! {
                    () = writer.write_forever(&store, &name, &render) => {},
                    () = stop => {},
                }
                // One last save of what changed, so that a clean stop loses nothing.
                if writer.wanted.load(Ordering::SeqCst) > *writer.saved.borrow() {
                    let _ = writer.write_once(&store, &name, &render).await;
                }
            });
        } else {
            // Nothing to wait for: every version counts as saved.
            snapshot.saved.send_replace(u64::MAX);
        }
        snapshot
    }

    /// The record changed; save it soon.
    pub fn touch(&self) {
        self.wanted.fetch_add(1, Ordering::SeqCst);
    }

    /// The record changed and the change must survive a crash before the caller goes on:
    /// waits until a version taken after this call is saved, or `within` passes (then `Err`:
    /// the store is unreachable; the change stays in memory and is saved once it is back).
    pub async fn durable(&self, within: Duration) -> Result<(), String> {
        let target = self.wanted.fetch_add(1, Ordering::SeqCst) + 1;
        if *self.saved.borrow() >= target {
            return Ok(());
        }
        self.urgent.store(target, Ordering::SeqCst);
        self.wake.notify_one();
        let mut saved = self.saved.subscribe();
        match tokio::time::timeout(within, saved.wait_for(|v| *v >= target)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err("the state store writer stopped".to_string()),
            Err(_) => Err(format!(
                "the state store did not confirm the change within {:.1} s",
                within.as_secs_f64()
            )),
        }
    }

    async fn write_once(&self, store: &Store, name: &str, render: &Render) -> Result<(), String> {
        let version = self.wanted.load(Ordering::SeqCst);
        let bytes = render()?;
        store.put(name, &bytes).await.map_err(|e| e.to_string())?;
        self.saved.send_if_modified(|saved| {
            let newer = version > *saved;
            if newer {
                *saved = version;
            }
            newer
        });
        Ok(())
    }

    async fn write_forever(&self, store: &Store, name: &str, render: &Render) {
        let mut backoff = Backoff::link();
        let mut last_probe = tokio::time::Instant::now();
        let mut lost = false;
        loop {
            let saved = *self.saved.borrow();
            let wanted = self.wanted.load(Ordering::SeqCst);
            let urgent = self.urgent.load(Ordering::SeqCst) > saved;
            if wanted > saved || lost {
                if !urgent && !lost {
                    // Soft changes only: gather more of them, unless an urgent one comes.
                    let _ = tokio::time::timeout(Self::SOFT_DELAY, self.wake.notified()).await;
                }
                match self.write_once(store, name, render).await {
                    Ok(()) => {
                        if lost {
                            tracing::warn!(store = %store.description(), key = name, "the state store had lost this service's state; written back");
                        }
                        lost = false;
                        backoff.reset();
                    }
                    Err(err) => {
                        tracing::warn!(key = name, %err, "saving state failed; retrying");
                        backoff.wait().await;
                    }
                }
                continue;
            }
            if last_probe.elapsed() >= Self::PROBE_EVERY {
                last_probe = tokio::time::Instant::now();
                // A Redis restarted without persistence comes back empty: write the record
                // back rather than wait for the next change.
                match store.exists(name).await {
                    Ok(false) => lost = true,
                    Ok(true) => {}
                    Err(err) => tracing::warn!(key = name, %err, "state store unreachable"),
                }
                continue;
            }
            let _ = tokio::time::timeout(Self::PROBE_EVERY, self.wake.notified()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_the_url_never_reaches_a_message() {
        assert_eq!(
            redacted("redis://user:hunter2@db:6379/0"),
            "redis://***@db:6379/0"
        );
        assert_eq!(redacted("redis://db:6379/0"), "redis://db:6379/0");
    }

    #[tokio::test]
    async fn the_memory_store_keeps_values_and_hashes_apart_per_namespace() {
        let store = Store::memory("a");
        store.put("x", b"1").await.unwrap();
        store.hash_put("h", "p", b"2").await.unwrap();
        assert_eq!(store.get("x").await.unwrap(), Some(b"1".to_vec()));
        assert!(store.exists("h").await.unwrap());
        assert_eq!(
            store.hash_get_all("h").await.unwrap(),
            BTreeMap::from([("p".to_string(), b"2".to_vec())])
        );
        store.delete("h").await.unwrap();
        assert!(!store.exists("h").await.unwrap());
        assert!(!store.is_durable());
    }

    #[tokio::test]
    async fn without_a_durable_store_durable_returns_at_once() {
        let shutdown = Shutdown::new();
        let snapshot = Snapshot::start(
            Store::memory("t"),
            "s",
            Box::new(|| Ok(b"x".to_vec())),
            &shutdown,
        );
        snapshot.touch();
        snapshot.durable(Duration::from_millis(1)).await.unwrap();
    }
}
