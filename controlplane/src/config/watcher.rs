//! Watching a config directory: a thread re-reads it every poll interval
//! (comparing each file's content, so it works on every filesystem and
//! catches edits within one mtime tick) and publishes a new
//! [`ConfigSnapshot`] when something changed. Each problem is logged once
//! while it lasts, each applied change once.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use super::dir::{ConfigDir, ConfigError};
use super::{ConfigSnapshot, Kind, ObjectKey};

/// How often the directory is re-read by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A config directory being watched; dropping it stops the watching.
#[derive(Debug)]
pub struct ConfigWatcher {
    receiver: watch::Receiver<Arc<ConfigSnapshot>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ConfigWatcher {
    /// Reads `dir` (an error if it cannot be listed), logs what it holds,
    /// and starts re-reading it every `poll_interval`. Needs no async
    /// runtime: the watching runs on its own thread.
    pub fn start(dir: impl Into<PathBuf>, poll_interval: Duration) -> Result<Self, ConfigError> {
        let mut config = ConfigDir::new(dir);
        config.rescan()?;
        let snapshot = Arc::new(config.snapshot());
        log_errors(&ConfigSnapshot::default(), &snapshot);
        tracing::info!(
            dir = %config.dir().display(),
            "config loaded: {}",
            snapshot.summary()
        );
        let (sender, receiver) = watch::channel(snapshot);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("config-watcher".into())
            .spawn({
                let stop = stop.clone();
                move || watch_loop(config, sender, poll_interval, &stop)
            })
            .map_err(ConfigError::Watch)?;
        Ok(Self {
            receiver,
            stop,
            thread: Some(thread),
        })
    }

    /// A receiver of every new snapshot (the current one is marked seen).
    pub fn subscribe(&self) -> watch::Receiver<Arc<ConfigSnapshot>> {
        self.receiver.clone()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<ConfigSnapshot> {
        self.receiver.borrow().clone()
    }
}

impl Drop for ConfigWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

fn watch_loop(
    mut config: ConfigDir,
    sender: watch::Sender<Arc<ConfigSnapshot>>,
    poll_interval: Duration,
    stop: &AtomicBool,
) {
    let mut dir_error: Option<String> = None;
    loop {
        std::thread::park_timeout(poll_interval);
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match config.rescan() {
            Ok(false) => dir_error = None,
            Ok(true) => {
                dir_error = None;
                let snapshot = Arc::new(config.snapshot());
                let previous = sender.borrow().clone();
                log_errors(&previous, &snapshot);
                log_changes(&previous, &snapshot);
                sender.send_replace(snapshot);
            }
            Err(e) => {
                let message = e.to_string();
                if dir_error.as_ref() != Some(&message) {
                    tracing::warn!("{message}; keeping the configuration read before");
                    dir_error = Some(message);
                }
            }
        }
    }
}

/// Logs the problems of `new` that `old` did not have.
fn log_errors(old: &ConfigSnapshot, new: &ConfigSnapshot) {
    let known: BTreeSet<String> = old.errors.iter().map(ToString::to_string).collect();
    for error in &new.errors {
        if !known.contains(&error.to_string()) {
            tracing::warn!(
                file = %error.file.display(),
                problem = %error.problem,
                "{error}"
            );
        }
    }
}

/// Logs each object added, updated or removed.
fn log_changes(old: &ConfigSnapshot, new: &ConfigSnapshot) {
    fn diff<T: PartialEq>(
        kind: Kind,
        old: &std::collections::BTreeMap<ObjectKey, T>,
        new: &std::collections::BTreeMap<ObjectKey, T>,
        snapshot: &ConfigSnapshot,
    ) {
        for (key, object) in new {
            let change = match old.get(key) {
                None => "added",
                Some(before) if before != object => "updated",
                Some(_) => continue,
            };
            let source = snapshot
                .source(kind, key)
                .map(ToString::to_string)
                .unwrap_or_default();
            tracing::info!(%kind, object = %key, %source, "config {change}");
        }
        for key in old.keys().filter(|k| !new.contains_key(*k)) {
            tracing::info!(%kind, object = %key, "config removed");
        }
    }
    diff(
        Kind::WorkloadGroup,
        &old.workload_groups,
        &new.workload_groups,
        new,
    );
    diff(
        Kind::WorkloadEntry,
        &old.workload_entries,
        &new.workload_entries,
        new,
    );
    diff(Kind::Service, &old.services, &new.services, new);
    diff(Kind::Pod, &old.pods, &new.pods, new);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn publishes_edits() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("svc.yaml");
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n",
        )
        .unwrap();
        let watcher = ConfigWatcher::start(tmp.path(), Duration::from_millis(10)).unwrap();
        let mut rx = watcher.subscribe();
        assert_eq!(watcher.snapshot().services.len(), 1);
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\n",
        )
        .unwrap();
        tokio::time::timeout(Duration::from_secs(30), rx.changed())
            .await
            .expect("a new snapshot")
            .unwrap();
        assert_eq!(rx.borrow().services.len(), 2);
        drop(watcher);
        // The sender is gone with the thread.
        assert!(rx.changed().await.is_err());
    }
}
