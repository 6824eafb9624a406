//! `model.output_path`: every new global model written to a file the user names, so that the
//! final one is there once the federation finishes (and a crash loses at most the rounds since
//! the last write).
//!
//! Writes run on a blocking thread tracked by the process's [`Shutdown`] (a SIGTERM waits for
//! the one in progress), never on a round's close. Each goes to `<path>.tmp`, is fsynced and
//! renamed over `path`, so a reader sees a whole model file, old or new, never a torn one.
//! When rounds close faster than a model can be written, only the newest waiting model is
//! written: the file is the latest global model, not a log.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use rondo_net::shutdown::Shutdown;

#[derive(Debug)]
pub struct ModelOutput {
    path: PathBuf,
    /// The newest model not written yet, and whether a writer thread is running.
    state: Mutex<(Option<(u32, Bytes)>, bool)>,
}

impl ModelOutput {
    pub fn new(path: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            path,
            state: Mutex::new((None, false)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues `file`, the model of `round`, to be written; returns at once.
    pub fn publish(self: &Arc<Self>, round: u32, file: Bytes, shutdown: &Shutdown) {
        let mut state = self.state.lock();
        state.0 = Some((round, file));
        if state.1 {
            return; // the running writer takes it next
        }
        state.1 = true;
        drop(state);
        let output = self.clone();
        shutdown.spawn_blocking(move || output.drain());
    }

    /// Writes queued models until none is left.
    fn drain(&self) {
        loop {
            let next = {
                let mut state = self.state.lock();
                match state.0.take() {
                    Some(next) => next,
                    None => {
                        state.1 = false;
                        return;
                    }
                }
            };
            let (round, file) = next;
            match write_atomically(&self.path, &file) {
                Ok(()) => {
                    tracing::info!(round, path = %self.path.display(), "global model written")
                }
                Err(err) => tracing::warn!(
                    round,
                    path = %self.path.display(),
                    "could not write the global model: {err}"
                ),
            }
        }
    }
}

fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = File::create(&tmp)?;
    file.write_all(data)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The rename itself is durable only once the directory is.
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_newest_model_ends_up_in_the_file_whole() {
        let dir = std::env::temp_dir().join(format!("rondo-output-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        let output = ModelOutput::new(path.clone());
        let shutdown = Shutdown::new();
        for round in 1..=20u32 {
            output.publish(round, Bytes::from(vec![round as u8; 1 << 16]), &shutdown);
        }
        shutdown.trigger();
        shutdown.drain(std::time::Duration::from_secs(10)).await;
        let written = std::fs::read(&path).unwrap();
        assert_eq!(written, vec![20u8; 1 << 16], "the last model, whole");
        assert!(!dir.join("model.safetensors.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
