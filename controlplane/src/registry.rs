//! WorkloadEntry auto-registration, as istiod does it (istio/istio
//! `pilot/pkg/autoregistration/controller.go`): a VM whose proxy connects
//! with `AUTO_REGISTER_GROUP` gets a WorkloadEntry made from that
//! WorkloadGroup, named `<group>-<ip>[-<network>]`; when its last xDS stream
//! closes the entry is marked disconnected and, unless the VM reconnects
//! within the grace period, deleted. A proxy with `WORKLOAD_ENTRY` names a
//! pre-created entry instead; if that entry accepts health reports, the
//! proxy becomes its controller while connected.
//!
//! The xDS server drives it: [`Registry::connect`] when a stream starts
//! (after parsing the node and verifying the client certificate; an error
//! ends the stream with [`RegistrationError::code`]), and
//! [`Registry::disconnect`] with the returned [`Connection`] when the stream
//! ends. [`Registry::subscribe`] publishes the entries (those of the config
//! directory, read-only, and those this registry manages) after every
//! change, for endpoint discovery.
//!
//! Managed entries live in the state directory ([`store`]), so they survive a
//! restart. At start no VM is connected yet: entries a previous run left
//! connected are marked disconnected now, and like every disconnected entry
//! deleted after the grace period unless the VM reconnects (a crashed
//! control plane leaks nothing). Every sweep interval the same rules are
//! applied to all entries again.
//!
//! Not done, unlike istiod: cleanups are not rate-limited (istiod: 20/s),
//! entries of a deleted WorkloadGroup are not garbage-collected (they go
//! when their VM disconnects), and connection annotations of read-only
//! entries from the config directory are kept in memory only.

pub mod entry;
pub mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::ca::SpiffeId;
use crate::config::ConfigSnapshot;
use crate::config::meta::{
    ObjectKey, format_rfc3339, format_rfc3339_nano, is_dns_subdomain, parse_rfc3339, random_uid,
};
use crate::config::workload_entry::{Condition, HEALTHY_CONDITION, WorkloadEntry};
use crate::node::ProxyNode;
use entry::{
    CONNECTED_AT, DISCONNECTED_AT, WORKLOAD_CONTROLLER, accepts_health_reports,
    auto_registered_name, entry_from_group, is_auto_registered, is_health_checked, mark_connected,
    mark_disconnected,
};
pub use store::{StoredEntryError, WorkloadEntryStore};

/// istiod's `PILOT_WORKLOAD_ENTRY_GRACE_PERIOD`.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(10);
/// The `istio.io/workloadController` value of entries this control plane
/// manages (istiod writes its pod name).
pub const DEFAULT_CONTROLLER_NAME: &str = "meshvm-controlplane";

/// How the registry behaves.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// How long a disconnected VM's entry is kept for it to reconnect.
    pub grace_period: Duration,
    /// Written as `istio.io/workloadController`; entries another controller
    /// marked connected are not marked disconnected by this one.
    pub controller_name: String,
    /// How often every entry is checked for cleanup; `None`: ten grace
    /// periods, as istiod.
    pub sweep_interval: Option<Duration>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            grace_period: DEFAULT_GRACE_PERIOD,
            controller_name: DEFAULT_CONTROLLER_NAME.into(),
            sweep_interval: None,
        }
    }
}

impl RegistryOptions {
    /// The sweep interval in effect.
    pub fn sweep_interval(&self) -> Duration {
        self.sweep_interval.unwrap_or(self.grace_period * 10)
    }
}

/// A connecting proxy: its parsed node and the identities its client
/// certificate proved (SPIFFE URI SANs verified against the mesh root).
#[derive(Debug, Clone)]
pub struct Proxy {
    pub node: ProxyNode,
    pub identities: Vec<SpiffeId>,
}

/// A proxy's stream counted against a WorkloadEntry. Hand it back to
/// [`Registry::disconnect`] when the stream ends: while any stream for the
/// entry is connected the entry stays.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a connection must be handed back to Registry::disconnect when the stream ends"]
pub struct Connection {
    entry: ObjectKey,
    auto_registered: bool,
}

impl Connection {
    /// The WorkloadEntry the stream is for (health reports go to it).
    pub fn entry(&self) -> &ObjectKey {
        &self.entry
    }

    /// Whether the entry was made by auto-registration (rather than named
    /// by `WORKLOAD_ENTRY`).
    pub fn auto_registered(&self) -> bool {
        self.auto_registered
    }
}

/// Why the registry could not be opened, or could not store a change.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("the registry needs a Tokio runtime (open it from within one)")]
    NoRuntime,
    #[error("state directory {}: {error}", path.display())]
    StateDir { path: PathBuf, error: io::Error },
}

/// Why a proxy's stream is refused. [`RegistrationError::code`] is the gRPC
/// status the xDS server ends the stream with; the message names the cause.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("authorization failed: the connection has no verified identity (client certificate)")]
    NoIdentity,
    #[error(
        "authorization failed: no identities ({identities}) matched {namespace}/{service_account}"
    )]
    IdentityMismatch {
        identities: String,
        namespace: String,
        service_account: String,
    },
    #[error(
        "registration of WorkloadEntry {entry} refused: the connection's identity has service account {identity:?}, the entry {entry_service_account:?}"
    )]
    ServiceAccountMismatch {
        entry: ObjectKey,
        identity: String,
        entry_service_account: String,
    },
    #[error(
        "auto-registration of {proxy} failed: the proxy has no namespace (node metadata NAMESPACE)"
    )]
    NoNamespace { proxy: String },
    #[error(
        "auto-registration of {proxy} failed: `{name}` is not a valid WorkloadEntry name (check AUTO_REGISTER_GROUP and NETWORK)"
    )]
    InvalidName { proxy: String, name: String },
    #[error("auto-registration WorkloadEntry of {proxy} failed: cannot find WorkloadGroup {group}")]
    GroupNotFound { proxy: String, group: ObjectKey },
    #[error(
        "proxy metadata indicates that it must correspond to an existing WorkloadEntry, however WorkloadEntry {entry} is not found"
    )]
    EntryNotFound { entry: ObjectKey },
    #[error(
        "auto-registration of {proxy} failed: the stored WorkloadEntry {entry} is malformed ({problem}); fix or remove the file"
    )]
    StoredEntryMalformed {
        proxy: String,
        entry: ObjectKey,
        problem: StoredEntryError,
    },
    #[error("registration of {proxy} failed: error writing WorkloadEntry {entry}: {error}")]
    Store {
        proxy: String,
        entry: ObjectKey,
        error: io::Error,
    },
    #[error("registration of {proxy} failed: the registry task stopped: {reason}")]
    Task { proxy: String, reason: String },
}

impl RegistrationError {
    /// The gRPC status code for the stream.
    pub fn code(&self) -> tonic::Code {
        use RegistrationError::*;
        match self {
            NoIdentity | IdentityMismatch { .. } | ServiceAccountMismatch { .. } => {
                tonic::Code::PermissionDenied
            }
            NoNamespace { .. } | InvalidName { .. } => tonic::Code::InvalidArgument,
            GroupNotFound { .. } | EntryNotFound { .. } | StoredEntryMalformed { .. } => {
                tonic::Code::FailedPrecondition
            }
            Store { .. } | Task { .. } => tonic::Code::Internal,
        }
    }
}

/// The WorkloadEntry registry. Shared by all streams (wrap it in an `Arc`);
/// dropping it stops its background tasks.
pub struct Registry {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("state_dir", &self.inner.store.dir())
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

struct Inner {
    options: RegistryOptions,
    store: WorkloadEntryStore,
    config: watch::Receiver<Arc<ConfigSnapshot>>,
    runtime: Handle,
    state: Mutex<State>,
    published: watch::Sender<PublishedEntries>,
}

/// Where the current version of an entry lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The config directory: read-only; connection annotations and a
    /// cleared health condition are kept in an [`Overlay`].
    Config,
    /// The state directory.
    Store,
}

/// What the registry changed on a read-only entry of the config directory.
#[derive(Debug, Clone, Default)]
struct Overlay {
    /// Connection annotations: a value, or `None` for removed.
    annotations: BTreeMap<String, Option<String>>,
    /// The `Healthy` condition, if it differs from the config's: a new one,
    /// or `None` for removed.
    health: Option<Option<Condition>>,
}

const OVERLAY_ANNOTATIONS: [&str; 3] = [WORKLOAD_CONTROLLER, CONNECTED_AT, DISCONNECTED_AT];

#[derive(Debug, Default)]
struct State {
    /// Shared with what is published: a change replaces one entry, and
    /// publishing copies pointers, not entries.
    stored: BTreeMap<ObjectKey, Arc<WorkloadEntry>>,
    malformed: BTreeMap<ObjectKey, StoredEntryError>,
    overlays: BTreeMap<ObjectKey, Overlay>,
    /// Open streams per entry.
    streams: HashMap<ObjectKey, u32>,
    /// Entries waiting for their grace period, with the timer's number: a
    /// reconnect or a newer timer makes the old one do nothing.
    pending: HashMap<ObjectKey, u64>,
    next_timer: u64,
}

/// Every WorkloadEntry, as published after each change; entries that did
/// not change are the same allocations as in the previous list.
pub type PublishedEntries = Arc<Vec<Arc<WorkloadEntry>>>;

impl Registry {
    /// Opens the registry on `state_dir` (created if missing) with the
    /// config directory's snapshots from `config`, and sweeps the stored
    /// entries (see the module docs). Must be called within a Tokio runtime,
    /// which runs the grace-period timers and the periodic sweep.
    pub fn open(
        state_dir: impl Into<PathBuf>,
        config: watch::Receiver<Arc<ConfigSnapshot>>,
        options: RegistryOptions,
    ) -> Result<Self, RegistryError> {
        let runtime = Handle::try_current().map_err(|_| RegistryError::NoRuntime)?;
        let state_dir = state_dir.into();
        let store = WorkloadEntryStore::new(&state_dir);
        let dir_error = |error| RegistryError::StateDir {
            path: state_dir.clone(),
            error,
        };
        store.create().map_err(dir_error)?;
        let loaded = store.load().map_err(dir_error)?;
        tracing::info!(
            dir = %store.dir().display(),
            entries = loaded.entries.len(),
            malformed = loaded.malformed.len(),
            "WorkloadEntries loaded"
        );
        for error in loaded.malformed.values() {
            tracing::warn!("{error}; the stored WorkloadEntry is left as it is");
        }
        let (published, _) = watch::channel(Arc::new(Vec::new()));
        let inner = Arc::new(Inner {
            options,
            store,
            config,
            runtime,
            state: Mutex::new(State {
                stored: loaded
                    .entries
                    .into_iter()
                    .map(|(key, entry)| (key, Arc::new(entry)))
                    .collect(),
                malformed: loaded.malformed,
                ..State::default()
            }),
            published,
        });
        inner.sweep();
        let tasks = vec![
            inner
                .runtime
                .spawn(sweep_periodically(Arc::downgrade(&inner))),
            inner
                .runtime
                .spawn(follow_config(Arc::downgrade(&inner), inner.config.clone())),
        ];
        Ok(Self { inner, tasks })
    }

    /// Registers a connecting proxy (see the module docs): `Ok(None)` if it
    /// neither auto-registers nor names a health-checked entry, else the
    /// connection to hand back to [`Registry::disconnect`].
    ///
    /// First, as istiod's xDS identity check: one of the proxy's verified
    /// identities must be in its config namespace and, if the proxy names
    /// a `SERVICE_ACCOUNT`, have that service account. The entry's
    /// `spec.serviceAccount`, if set, must be the identity's too.
    /// The entry is written (and fsynced) on the blocking pool, so that a
    /// burst of registrations does not stall the streams' async tasks.
    pub async fn connect(&self, proxy: &Proxy) -> Result<Option<Connection>, RegistrationError> {
        let inner = self.inner.clone();
        let owned = proxy.clone();
        tokio::task::spawn_blocking(move || inner.connect(&owned))
            .await
            .map_err(|e| RegistrationError::Task {
                proxy: proxy.node.node_id.clone(),
                reason: e.to_string(),
            })?
    }

    /// Ends a stream: when the entry's last stream is gone, the entry is
    /// marked disconnected and cleaned up after the grace period unless a
    /// stream for it connects again.
    pub fn disconnect(&self, connection: Connection) {
        self.inner.disconnect(connection);
    }

    /// [`Registry::disconnect`] on the blocking pool (it writes the entry),
    /// for callers on the async runtime.
    pub async fn disconnect_async(&self, connection: Connection) {
        let inner = self.inner.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || inner.disconnect(connection)).await {
            tracing::error!(error = %e, "disconnect task failed");
        }
    }

    /// Every WorkloadEntry, sorted by namespace and name: the config
    /// directory's (with connection annotations) and the managed ones.
    /// A health report from the proxy of `connection` (istiod's
    /// `QueueWorkloadEntryHealth`): sets the entry's `Healthy` condition —
    /// `True`, or `False` with `message` — if it accepts health reports;
    /// the probe time is now, the transition time changes with the status.
    /// Whether the entry changed.
    pub fn report_health(
        &self,
        connection: &Connection,
        healthy: bool,
        message: Option<&str>,
    ) -> Result<bool, RegistryError> {
        self.inner
            .report_health(&connection.entry, healthy, message, SystemTime::now())
            .map_err(|error| RegistryError::StateDir {
                path: self.inner.store.dir().to_path_buf(),
                error,
            })
    }

    pub fn workload_entries(&self) -> Vec<WorkloadEntry> {
        let config = self.inner.config.borrow().clone();
        let state = self.inner.lock();
        merged_entries(&config, &state.stored, &state.overlays)
            .into_iter()
            .map(Arc::unwrap_or_clone)
            .collect()
    }

    /// One WorkloadEntry.
    pub fn workload_entry(&self, key: &ObjectKey) -> Option<WorkloadEntry> {
        let config = self.inner.config.borrow().clone();
        let state = self.inner.lock();
        current(&config, &state, key).map(|(entry, _)| entry)
    }

    /// The entries after every change (the current list is marked seen).
    pub fn subscribe(&self) -> watch::Receiver<PublishedEntries> {
        self.inner.published.subscribe()
    }

    /// Stored files that are not valid entries (found at open).
    pub fn store_errors(&self) -> Vec<StoredEntryError> {
        self.inner.lock().malformed.values().cloned().collect()
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.inner.options
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Every entry: the config directory's, with overlays applied, then the
/// stored ones it does not define; sorted by key.
fn merged_entries(
    config: &ConfigSnapshot,
    stored: &BTreeMap<ObjectKey, Arc<WorkloadEntry>>,
    overlays: &BTreeMap<ObjectKey, Overlay>,
) -> Vec<Arc<WorkloadEntry>> {
    // Both maps are sorted by key: merge them in one pass.
    let mut from_config = config.workload_entries.iter().peekable();
    let mut from_store = stored.iter().peekable();
    let mut all = Vec::with_capacity(config.workload_entries.len() + stored.len());
    loop {
        let order = match (from_config.peek(), from_store.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((a, _)), Some((b, _))) => a.cmp(b),
        };
        if order == std::cmp::Ordering::Equal {
            // The config directory's entry wins over a stored one.
            from_store.next();
        }
        let take_config = order != std::cmp::Ordering::Greater;
        if take_config {
            let (key, entry) = from_config.next().expect("peeked");
            all.push(Arc::new(with_overlay(entry.clone(), overlays.get(key))));
        } else {
            all.push(from_store.next().expect("peeked").1.clone());
        }
    }
    all
}

/// Every entry of a config directory and a state directory, as a registry
/// on them would list them before any proxy connects (for `get`).
pub fn list_entries(
    config: &ConfigSnapshot,
    stored: &BTreeMap<ObjectKey, WorkloadEntry>,
) -> Vec<WorkloadEntry> {
    let stored = stored
        .iter()
        .map(|(key, entry)| (key.clone(), Arc::new(entry.clone())))
        .collect();
    merged_entries(config, &stored, &BTreeMap::new())
        .into_iter()
        .map(Arc::unwrap_or_clone)
        .collect()
}

fn with_overlay(mut entry: WorkloadEntry, overlay: Option<&Overlay>) -> WorkloadEntry {
    let Some(overlay) = overlay else {
        return entry;
    };
    for (key, value) in &overlay.annotations {
        match value {
            Some(v) => entry.metadata.annotations.insert(key.clone(), v.clone()),
            None => entry.metadata.annotations.remove(key),
        };
    }
    if let Some(health) = &overlay.health {
        set_health_condition(&mut entry, health.clone());
    }
    entry
}

fn health_condition(entry: &WorkloadEntry) -> Option<&Condition> {
    entry
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == HEALTHY_CONDITION)
}

/// Replaces (or with `None` removes) the entry's `Healthy` condition.
fn set_health_condition(entry: &mut WorkloadEntry, condition: Option<Condition>) {
    let status = entry.status.get_or_insert_with(Default::default);
    status.conditions.retain(|c| c.type_ != HEALTHY_CONDITION);
    status.conditions.extend(condition);
    if status.conditions.is_empty() {
        entry.status = None;
    }
}

/// The current version of the entry `key` and where it lives.
fn current(
    config: &ConfigSnapshot,
    state: &State,
    key: &ObjectKey,
) -> Option<(WorkloadEntry, Origin)> {
    if let Some(entry) = config.workload_entries.get(key) {
        return Some((
            with_overlay(entry.clone(), state.overlays.get(key)),
            Origin::Config,
        ));
    }
    state
        .stored
        .get(key)
        .map(|entry| (WorkloadEntry::clone(entry), Origin::Store))
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn config(&self) -> Arc<ConfigSnapshot> {
        self.config.borrow().clone()
    }

    /// Makes `entry` the current version: written to the state directory,
    /// or for a config directory entry, remembered as an overlay.
    fn put(
        &self,
        config: &ConfigSnapshot,
        state: &mut State,
        origin: Origin,
        entry: WorkloadEntry,
    ) -> io::Result<()> {
        let key = entry.metadata.key();
        match origin {
            Origin::Store => {
                self.store.save(&entry)?;
                state.malformed.remove(&key);
                state.stored.insert(key, Arc::new(entry));
            }
            Origin::Config => {
                let base = config.workload_entries.get(&key).and_then(health_condition);
                let health = health_condition(&entry);
                let overlay = Overlay {
                    annotations: OVERLAY_ANNOTATIONS
                        .iter()
                        .map(|a| (a.to_string(), entry.metadata.annotations.get(*a).cloned()))
                        .collect(),
                    health: (base != health).then(|| health.cloned()),
                };
                state.overlays.insert(key, overlay);
            }
        }
        Ok(())
    }

    fn publish(&self, config: &ConfigSnapshot, state: &State) {
        let entries = merged_entries(config, &state.stored, &state.overlays);
        self.published.send_if_modified(|current| {
            if **current == entries {
                return false;
            }
            *current = Arc::new(entries);
            true
        });
    }

    fn connect(&self, proxy: &Proxy) -> Result<Option<Connection>, RegistrationError> {
        let identity = authorize(proxy)?;
        let metadata = &proxy.node.metadata;
        if let Some(group) = &metadata.auto_register_group {
            self.register(proxy, identity, group).map(Some)
        } else if let Some(name) = &metadata.workload_entry {
            self.become_controller(proxy, identity, name)
        } else {
            Ok(None)
        }
    }

    /// Creates, or marks connected, the proxy's auto-registered entry.
    fn register(
        &self,
        proxy: &Proxy,
        identity: &SpiffeId,
        group: &str,
    ) -> Result<Connection, RegistrationError> {
        let node = &proxy.node;
        let proxy_id = node.node_id.clone();
        let namespace = &node.config_namespace;
        if namespace.is_empty() {
            return Err(RegistrationError::NoNamespace { proxy: proxy_id });
        }
        let name = auto_registered_name(group, node.first_ip(), node.metadata.network.as_deref());
        // The namespace is a valid one: `authorize` matched it to a verified
        // identity's.
        if !is_dns_subdomain(&name) {
            return Err(RegistrationError::InvalidName {
                proxy: proxy_id,
                name,
            });
        }
        let key = ObjectKey::new(namespace, name);
        let config = self.config();
        let mut state = self.lock();
        let now = SystemTime::now();
        let store_error = |error| RegistrationError::Store {
            proxy: proxy_id.clone(),
            entry: key.clone(),
            error,
        };
        if let Some((mut entry, origin)) = current(&config, &state, &key) {
            ensure_can_control(identity, &entry)?;
            mark_connected(&mut entry, &self.options.controller_name, now);
            self.put(&config, &mut state, origin, entry)
                .map_err(store_error)?;
            tracing::info!(entry = %key, proxy = %proxy_id, "updated auto-registered WorkloadEntry");
        } else {
            if let Some(problem) = state.malformed.get(&key) {
                return Err(RegistrationError::StoredEntryMalformed {
                    proxy: proxy_id,
                    entry: key,
                    problem: problem.clone(),
                });
            }
            let group = config.workload_group(namespace, group).ok_or_else(|| {
                RegistrationError::GroupNotFound {
                    proxy: proxy_id.clone(),
                    group: ObjectKey::new(namespace, group),
                }
            })?;
            let mut entry = entry_from_group(&key.name, node, group);
            ensure_can_control(identity, &entry)?;
            entry.metadata.uid = Some(random_uid());
            entry.metadata.creation_timestamp = Some(format_rfc3339(now));
            mark_connected(&mut entry, &self.options.controller_name, now);
            let health = if accepts_health_reports(&entry) {
                " with health checking enabled"
            } else {
                ""
            };
            self.put(&config, &mut state, Origin::Store, entry)
                .map_err(store_error)?;
            tracing::info!(entry = %key, proxy = %proxy_id, "auto-registered WorkloadEntry{health}");
        }
        self.count_stream(&config, &mut state, &key);
        Ok(Connection {
            entry: key,
            auto_registered: true,
        })
    }

    /// Makes this control plane the controller of the pre-created entry the
    /// proxy names, if it accepts health reports.
    fn become_controller(
        &self,
        proxy: &Proxy,
        identity: &SpiffeId,
        name: &str,
    ) -> Result<Option<Connection>, RegistrationError> {
        let key = ObjectKey::new(&proxy.node.config_namespace, name);
        let config = self.config();
        let mut state = self.lock();
        let Some((mut entry, origin)) = current(&config, &state, &key) else {
            return Err(RegistrationError::EntryNotFound { entry: key });
        };
        if !accepts_health_reports(&entry) {
            return Ok(None);
        }
        ensure_can_control(identity, &entry)?;
        mark_connected(&mut entry, &self.options.controller_name, SystemTime::now());
        self.put(&config, &mut state, origin, entry)
            .map_err(|error| RegistrationError::Store {
                proxy: proxy.node.node_id.clone(),
                entry: key.clone(),
                error,
            })?;
        tracing::info!(entry = %key, proxy = %proxy.node.node_id, "updated health-checked WorkloadEntry");
        self.count_stream(&config, &mut state, &key);
        Ok(Some(Connection {
            entry: key,
            auto_registered: false,
        }))
    }

    fn report_health(
        &self,
        key: &ObjectKey,
        healthy: bool,
        message: Option<&str>,
        now: SystemTime,
    ) -> io::Result<bool> {
        let config = self.config();
        let mut state = self.lock();
        let Some((mut entry, origin)) = current(&config, &state, key) else {
            return Ok(false);
        };
        if !accepts_health_reports(&entry) {
            tracing::debug!(entry = %key, "health report for an entry without health checks: ignored");
            return Ok(false);
        }
        let status = if healthy { "True" } else { "False" };
        let previous = health_condition(&entry).cloned();
        let stamp = format_rfc3339_nano(now);
        let transition = match &previous {
            Some(p) if p.status == status => p.last_transition_time.clone(),
            _ => Some(stamp.clone()),
        };
        let condition = Condition {
            type_: HEALTHY_CONDITION.into(),
            status: status.into(),
            last_probe_time: Some(stamp),
            last_transition_time: transition,
            reason: None,
            message: (!healthy).then(|| message.unwrap_or("unhealthy").to_string()),
        };
        let changed = previous.as_ref().is_none_or(|p| {
            (p.status.as_str(), p.message.as_deref())
                != (condition.status.as_str(), condition.message.as_deref())
        });
        set_health_condition(&mut entry, Some(condition));
        self.put(&config, &mut state, origin, entry)?;
        if changed {
            tracing::info!(entry = %key, healthy, message, "WorkloadEntry health changed");
        }
        self.publish(&config, &state);
        Ok(changed)
    }

    fn count_stream(&self, config: &ConfigSnapshot, state: &mut State, key: &ObjectKey) {
        *state.streams.entry(key.clone()).or_default() += 1;
        state.pending.remove(key);
        self.publish(config, state);
    }

    fn disconnect(self: &Arc<Self>, connection: Connection) {
        let key = connection.entry;
        let config = self.config();
        let mut state = self.lock();
        match state.streams.get_mut(&key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                return;
            }
            Some(_) => {
                state.streams.remove(&key);
            }
            None => {
                tracing::warn!(entry = %key, "disconnect of a stream that was not connected");
                return;
            }
        }
        let Some((mut entry, origin)) = current(&config, &state, &key) else {
            tracing::info!(entry = %key, "WorkloadEntry already gone when its last stream closed");
            return;
        };
        if entry.metadata.annotations.get(WORKLOAD_CONTROLLER)
            != Some(&self.options.controller_name)
        {
            // Taken over by another controller meanwhile: it is theirs.
            return;
        }
        mark_disconnected(&mut entry, SystemTime::now());
        if let Err(e) = self.put(&config, &mut state, origin, entry) {
            tracing::warn!(entry = %key, "cannot mark the WorkloadEntry disconnected: {e}");
        }
        tracing::info!(
            entry = %key,
            grace_period = ?self.options.grace_period,
            "WorkloadEntry disconnected"
        );
        self.schedule_cleanup(&mut state, key, self.options.grace_period);
        self.publish(&config, &state);
    }

    /// Cleans `key` up after `delay` unless it reconnects first.
    fn schedule_cleanup(self: &Arc<Self>, state: &mut State, key: ObjectKey, delay: Duration) {
        state.next_timer += 1;
        let timer = state.next_timer;
        state.pending.insert(key.clone(), timer);
        let registry = Arc::downgrade(self);
        self.runtime.spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(registry) = registry.upgrade() {
                registry.cleanup_when_due(&key, timer);
            }
        });
    }

    fn cleanup_when_due(&self, key: &ObjectKey, timer: u64) {
        let config = self.config();
        let mut state = self.lock();
        if state.pending.get(key) != Some(&timer) {
            return;
        }
        state.pending.remove(key);
        if state.streams.contains_key(key) {
            return;
        }
        self.cleanup(&config, &mut state, key);
        self.publish(&config, &state);
    }

    /// A disconnected entry past its grace period: an auto-registered one
    /// is deleted, a health-checked one loses its `Healthy` condition.
    fn cleanup(&self, config: &ConfigSnapshot, state: &mut State, key: &ObjectKey) {
        let Some((mut entry, origin)) = current(config, state, key) else {
            return;
        };
        if entry.metadata.annotations.contains_key(CONNECTED_AT) {
            return;
        }
        if is_auto_registered(&entry) {
            if origin == Origin::Config {
                tracing::debug!(entry = %key, "auto-registered WorkloadEntry of the config directory is not deleted");
                return;
            }
            match self.store.delete(key) {
                Ok(()) => {
                    state.stored.remove(key);
                    tracing::info!(entry = %key, "cleaned up auto-registered WorkloadEntry");
                }
                Err(e) => tracing::warn!(
                    entry = %key,
                    "failed cleaning up auto-registered WorkloadEntry: {e}; retried at the next sweep"
                ),
            }
        } else if is_health_checked(&entry) && entry.has_health_condition() {
            if let Some(status) = &mut entry.status {
                status.conditions.retain(|c| c.type_ != HEALTHY_CONDITION);
            }
            match self.put(config, state, origin, entry) {
                Ok(()) => tracing::info!(entry = %key, "cleaned up health-checked WorkloadEntry"),
                Err(e) => tracing::warn!(
                    entry = %key,
                    "failed cleaning up health-checked WorkloadEntry: {e}"
                ),
            }
        }
    }

    /// Applies the cleanup rules to every entry without a stream or a
    /// pending timer: connected to this controller but without a stream (a
    /// previous run's) → marked disconnected now; disconnected → cleaned up
    /// once the grace period since `istio.io/disconnectedAt` has passed (an
    /// unreadable time counts as passed).
    fn sweep(self: &Arc<Self>) {
        let config = self.config();
        let mut state = self.lock();
        let now = SystemTime::now();
        let keys: Vec<ObjectKey> = merged_entries(&config, &state.stored, &state.overlays)
            .iter()
            .map(|e| e.metadata.key())
            .collect();
        for key in keys {
            if state.streams.contains_key(&key) || state.pending.contains_key(&key) {
                continue;
            }
            let Some((mut entry, origin)) = current(&config, &state, &key) else {
                continue;
            };
            if !has_cleanup(&entry) {
                continue;
            }
            let annotations = &entry.metadata.annotations;
            if annotations.contains_key(CONNECTED_AT) {
                if annotations.get(WORKLOAD_CONTROLLER) == Some(&self.options.controller_name) {
                    mark_disconnected(&mut entry, now);
                    if let Err(e) = self.put(&config, &mut state, origin, entry) {
                        tracing::warn!(entry = %key, "cannot mark the WorkloadEntry disconnected: {e}");
                        continue;
                    }
                    tracing::info!(entry = %key, "WorkloadEntry marked connected but no stream is: marked disconnected");
                    self.schedule_cleanup(&mut state, key, self.options.grace_period);
                }
                continue;
            }
            let Some(disconnected_at) = annotations.get(DISCONNECTED_AT) else {
                continue;
            };
            let remaining = match parse_rfc3339(disconnected_at) {
                Some(at) => {
                    let elapsed = now.duration_since(at).unwrap_or_default();
                    self.options.grace_period.saturating_sub(elapsed)
                }
                None => Duration::ZERO,
            };
            if remaining.is_zero() {
                self.cleanup(&config, &mut state, &key);
            } else {
                self.schedule_cleanup(&mut state, key, remaining);
            }
        }
        self.publish(&config, &state);
    }
}

/// Whether anything happens to `entry` once its workload is gone: an
/// auto-registered entry is deleted, a health-checked one with a health
/// condition loses it.
fn has_cleanup(entry: &WorkloadEntry) -> bool {
    is_auto_registered(entry) || (is_health_checked(entry) && entry.has_health_condition())
}

/// istiod's xDS identity check: a verified identity in the proxy's config
/// namespace with its `SERVICE_ACCOUNT`, if it names one.
fn authorize(proxy: &Proxy) -> Result<&SpiffeId, RegistrationError> {
    if proxy.identities.is_empty() {
        return Err(RegistrationError::NoIdentity);
    }
    let namespace = &proxy.node.config_namespace;
    let service_account = proxy.node.metadata.service_account.as_deref();
    proxy
        .identities
        .iter()
        .find(|id| {
            (namespace.is_empty() || id.namespace() == namespace)
                && service_account.is_none_or(|sa| id.service_account() == sa)
        })
        .ok_or_else(|| RegistrationError::IdentityMismatch {
            identities: proxy
                .identities
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            namespace: namespace.clone(),
            service_account: service_account.unwrap_or_default().to_string(),
        })
}

/// The connecting identity may act for `entry`: the entry's service
/// account, if set, is the identity's. (Its namespace is the identity's:
/// entries are looked up in the namespace [`authorize`] checked.)
fn ensure_can_control(identity: &SpiffeId, entry: &WorkloadEntry) -> Result<(), RegistrationError> {
    let entry_service_account = &entry.spec.service_account;
    if !entry_service_account.is_empty() && entry_service_account != identity.service_account() {
        return Err(RegistrationError::ServiceAccountMismatch {
            entry: entry.metadata.key(),
            identity: identity.service_account().to_string(),
            entry_service_account: entry_service_account.clone(),
        });
    }
    Ok(())
}

async fn sweep_periodically(registry: Weak<Inner>) {
    let Some(interval) = registry.upgrade().map(|r| r.options.sweep_interval()) else {
        return;
    };
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        ticks.tick().await;
        let Some(registry) = registry.upgrade() else {
            return;
        };
        registry.sweep();
    }
}

/// Republishes the entries when the config directory changes.
async fn follow_config(registry: Weak<Inner>, mut config: watch::Receiver<Arc<ConfigSnapshot>>) {
    while config.changed().await.is_ok() {
        let Some(registry) = registry.upgrade() else {
            return;
        };
        let snapshot = config.borrow_and_update().clone();
        let state = registry.lock();
        registry.publish(&snapshot, &state);
    }
}
