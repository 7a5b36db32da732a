//! [`Harness`]: one compiled proxy-wasm module plus the state its VMs share, and
//! [`PluginBuilder`] to start VMs from it.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use wasmtime::{Engine, ExternType, InstancePre, Linker, Module};

use crate::abi::LogLevel;
use crate::clock::Clock;
use crate::error::HarnessError;
use crate::plugin::Plugin;
use crate::property;
use crate::shared::SharedState;
use crate::state::HostState;

/// ABI version exports the harness accepts (it implements v0.2.1; v0.2.0 differs
/// only in calls the harness also provides).
pub(crate) const ABI_VERSION_EXPORTS: [&str; 2] =
    ["proxy_abi_version_0_2_1", "proxy_abi_version_0_2_0"];

/// A compiled proxy-wasm module and the Envoy-process-like state its VMs share
/// (shared data, shared queues, the fake clock).
///
/// Exists so a test compiles a `.wasm` once and starts as many VMs as it needs
/// (one per "worker", a singleton next to filters, ...) cheaply. Cloning is
/// cheap and the clone shares everything; [`Harness::isolated`] shares only
/// the compiled code.
#[derive(Clone)]
pub struct Harness {
    compiled: Arc<Compiled>,
    shared: Arc<SharedState>,
}

pub(crate) struct Compiled {
    pub(crate) pre: InstancePre<HostState>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness").finish_non_exhaustive()
    }
}

impl Harness {
    /// Reads and compiles a `.wasm` file (wasm32-wasip1 or wasm32-unknown-unknown).
    pub fn load(path: impl AsRef<Path>) -> Result<Harness, HarnessError> {
        let path = path.as_ref();
        let wasm = std::fs::read(path).map_err(|source| HarnessError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&wasm)
    }

    /// Compiles a module from its binary bytes and links the host functions.
    ///
    /// Fails when the bytes are not a valid module, an import has a signature
    /// that differs from the ABI, or `memory` / `proxy_abi_version_0_2_1` is
    /// not exported (Envoy refuses such modules too).
    pub fn from_bytes(wasm: &[u8]) -> Result<Harness, HarnessError> {
        let engine = Engine::default();
        let module =
            Module::new(&engine, wasm).map_err(|e| HarnessError::Load(format!("{e:#}")))?;
        let has_memory = module
            .exports()
            .any(|e| e.name() == "memory" && matches!(e.ty(), ExternType::Memory(_)));
        if !has_memory {
            return Err(HarnessError::MissingExport("memory".into()));
        }
        if !module
            .exports()
            .any(|e| ABI_VERSION_EXPORTS.contains(&e.name()))
        {
            return Err(HarnessError::MissingExport(ABI_VERSION_EXPORTS[0].into()));
        }
        let mut linker = Linker::new(&engine);
        crate::host::add_to_linker(&mut linker)
            .map_err(|e| HarnessError::Load(format!("{e:#}")))?;
        linker
            .define_unknown_imports_as_traps(&module)
            .map_err(|e| HarnessError::Load(format!("{e:#}")))?;
        let pre = linker
            .instantiate_pre(&module)
            .map_err(|e| HarnessError::Instantiate(format!("{e:#}")))?;
        Ok(Harness {
            compiled: Arc::new(Compiled { pre }),
            shared: Arc::new(SharedState::default()),
        })
    }

    /// A Harness with the same compiled module but fresh shared data, queues
    /// and clock, for tests that cache the compiled module but must not see
    /// each other's state.
    pub fn isolated(&self) -> Harness {
        Harness {
            compiled: Arc::clone(&self.compiled),
            shared: Arc::new(SharedState::default()),
        }
    }

    /// Starts describing one VM with one root context (call [`PluginBuilder::start`]).
    pub fn plugin(&self) -> PluginBuilder {
        PluginBuilder {
            harness: self.clone(),
            vm_id: String::new(),
            root_id: String::new(),
            plugin_name: String::new(),
            vm_configuration: Vec::new(),
            configuration: Vec::new(),
            properties: Vec::new(),
            clusters: BTreeSet::new(),
            env: Vec::new(),
            log_level: LogLevel::Trace,
            echo_logs: true,
            root_context_id: 1,
        }
    }

    /// The fake clock every VM of this Harness reads.
    pub fn clock(&self) -> Clock {
        self.shared.clock.clone()
    }

    /// Shared data as a guest would read it: value and CAS, or None.
    pub fn shared_data(&self, vm_id: &str, key: &str) -> Option<(Vec<u8>, u32)> {
        self.shared.get_data(vm_id, key)
    }

    /// Writes shared data unconditionally (as another VM would) and returns the new CAS.
    pub fn set_shared_data(&self, vm_id: &str, key: &str, value: impl Into<Vec<u8>>) -> u32 {
        // CAS 0 is unconditional, so this cannot fail.
        self.shared
            .set_data(vm_id, key, value.into(), 0)
            .unwrap_or(0)
    }

    /// Enqueues onto a registered queue (as a producer VM would); false when no
    /// VM registered (vm_id, name). The owner is notified on its next
    /// `Plugin::deliver_queue_notifications`.
    pub fn enqueue_shared_queue(&self, vm_id: &str, name: &str, value: impl Into<Vec<u8>>) -> bool {
        match self.shared.resolve_queue(vm_id, name) {
            Some(token) => self.shared.enqueue(token, value.into()).is_ok(),
            None => false,
        }
    }

    /// Number of values waiting in a queue; None when it is not registered.
    pub fn shared_queue_len(&self, vm_id: &str, name: &str) -> Option<usize> {
        let token = self.shared.resolve_queue(vm_id, name)?;
        self.shared.queue_len(token)
    }

    pub(crate) fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    pub(crate) fn shared(&self) -> &Arc<SharedState> {
        &self.shared
    }
}

/// Describes one VM and its first root context, the way Envoy's `PluginConfig`
/// and `VmConfig` do.
///
/// Exists so tests set up exactly what Envoy would give the filter (vm_id,
/// root_id, configurations, node metadata, clusters) before it starts.
#[derive(Debug)]
#[must_use = "call .start() to create the VM"]
pub struct PluginBuilder {
    pub(crate) harness: Harness,
    pub(crate) vm_id: String,
    pub(crate) root_id: String,
    pub(crate) plugin_name: String,
    pub(crate) vm_configuration: Vec<u8>,
    pub(crate) configuration: Vec<u8>,
    pub(crate) properties: Vec<(Vec<String>, Vec<u8>)>,
    pub(crate) clusters: BTreeSet<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) log_level: LogLevel,
    pub(crate) echo_logs: bool,
    pub(crate) root_context_id: u32,
}

impl PluginBuilder {
    /// The VM id (default ""): shared data and queues are scoped by it; also
    /// the property `plugin_vm_id`.
    pub fn vm_id(mut self, id: &str) -> Self {
        self.vm_id = id.to_string();
        self
    }

    /// The root id (default ""): also the property `plugin_root_id`, which a
    /// module loaded both as filter and singleton uses to tell them apart.
    pub fn root_id(mut self, id: &str) -> Self {
        self.root_id = id.to_string();
        self
    }

    /// The plugin name (default ""): the property `plugin_name`.
    pub fn plugin_name(mut self, name: &str) -> Self {
        self.plugin_name = name.to_string();
        self
    }

    /// `vm_config.configuration`: passed to `proxy_on_vm_start`.
    pub fn vm_configuration(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.vm_configuration = bytes.into();
        self
    }

    /// The plugin configuration passed to `proxy_on_configure` (Istio sends
    /// `pluginConfig` as JSON).
    pub fn configuration(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.configuration = bytes.into();
        self
    }

    /// A VM-level property, e.g. `(&["xds","node","metadata","NAME"], "pod-1")`.
    /// Encode non-string values with [`crate::property`].
    pub fn property(mut self, path: &[&str], value: impl Into<Vec<u8>>) -> Self {
        self.properties
            .push((property::owned_path(path), value.into()));
        self
    }

    /// Shorthand for the node metadata property `xds.node.metadata.KEY`.
    pub fn node_metadata(self, key: &str, value: impl Into<Vec<u8>>) -> Self {
        self.property(&["xds", "node", "metadata", key], value)
    }

    /// An upstream cluster `proxy_http_call` may use; other names give BadArgument.
    pub fn cluster(mut self, name: &str) -> Self {
        self.clusters.insert(name.to_string());
        self
    }

    /// A WASI environment variable (Envoy's `vm_config.environment_variables`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// The level `proxy_get_log_level` reports; messages below it are dropped
    /// (default Trace: everything is captured).
    pub fn log_level(mut self, level: LogLevel) -> Self {
        self.log_level = level;
        self
    }

    /// Whether captured log messages are also printed to stderr (default true;
    /// libtest shows them only for failing tests).
    pub fn echo_logs(mut self, echo: bool) -> Self {
        self.echo_logs = echo;
        self
    }

    /// The id of the first root context (default 1); HTTP contexts get the
    /// following ids.
    pub fn root_context_id(mut self, id: u32) -> Self {
        self.root_context_id = id;
        self
    }

    /// Instantiates the VM, calls `_initialize`, creates the root context and
    /// calls `proxy_on_vm_start` then `proxy_on_configure`, like Envoy.
    ///
    /// Returns Ok even when those return false (see [`Plugin::vm_started`] and
    /// [`Plugin::configured`]); Err only for traps, ABI or instantiation errors.
    pub fn start(self) -> Result<Plugin, HarnessError> {
        Plugin::start(self)
    }
}
