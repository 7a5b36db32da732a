//! [`Plugin`]: one running VM (one `wasmtime::Store`) with its root context(s),
//! driven by a test the way Envoy drives a filter.

use std::collections::{BTreeMap, BTreeSet};
use std::mem;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Instance, Store, WasmParams, WasmResults};

use crate::abi::{Action, LogLevel, Status};
use crate::error::HarnessError;
use crate::harness::{Harness, PluginBuilder};
use crate::header_map::HeaderMap;
use crate::host::metrics::Metrics;
use crate::property::{self, PropertyMap};
use crate::records::{ForeignCall, GrpcCall, HttpCall, LogEntry};
use crate::request::{HttpExchange, HttpRequest};
use crate::state::{
    Access, CallResponse, Context, HostState, RootState, StreamState, default_stream_properties,
};
use crate::stream::HttpStream;

/// A running VM with its root context, created by [`PluginBuilder::start`].
///
/// Exists so a test can drive a filter like Envoy does (requests, ticks, HTTP
/// call responses, queue notifications) and then inspect what it did (logs,
/// metrics, properties, calls). Each Plugin owns its own wasmtime store, so
/// tests run in parallel. After a guest trap the VM is failed: every later call
/// returns [`HarnessError::VmFailed`], as Envoy stops using a crashed VM.
pub struct Plugin {
    pub(crate) store: Store<HostState>,
    instance: Instance,
    harness: Harness,
    root_context_id: u32,
    next_context_id: u32,
    failed: bool,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("vm_id", &self.store.data().vm_id)
            .field("root_context_id", &self.root_context_id)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.harness
            .shared()
            .drop_instance(self.store.data().instance_id);
    }
}

/// Which callback of a stream just ran, to settle its access rules.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Part {
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
}

fn size_arg(len: usize) -> i32 {
    u32::try_from(len).unwrap_or(u32::MAX) as i32
}

impl Plugin {
    pub(crate) fn start(b: PluginBuilder) -> Result<Plugin, HarnessError> {
        let harness = b.harness.clone();
        let shared = Arc::clone(harness.shared());
        let mut properties = PropertyMap::default();
        properties.set(vec!["plugin_vm_id".into()], b.vm_id.as_bytes().to_vec());
        for (path, value) in b.properties {
            properties.set(path, value);
        }
        let instance_id = shared.new_instance();
        let state = HostState {
            shared: Arc::clone(&shared),
            instance_id,
            vm_id: b.vm_id,
            vm_configuration: b.vm_configuration,
            env: b.env,
            clusters: b.clusters,
            properties,
            contexts: BTreeMap::new(),
            current_context: 0,
            effective_context: 0,
            log_level: b.log_level,
            echo_logs: b.echo_logs,
            logs: Vec::new(),
            stdout: Vec::new(),
            stderr: Vec::new(),
            metrics: Metrics::default(),
            http_calls: Vec::new(),
            pending_http_calls: BTreeMap::new(),
            last_http_token: 0,
            http_call_response: None,
            call_status: None,
            grpc_calls: Vec::new(),
            last_grpc_token: 0,
            foreign_calls: Vec::new(),
            plugin_config_visible: None,
            memory: None,
            allocator: None,
            rng: 0x9e37_79b9_7f4a_7c15 ^ instance_id,
            done_calls: 0,
        };
        let pre = &harness.compiled().pre;
        let mut store = Store::new(pre.module().engine(), state);
        let instance = match pre.instantiate(&mut store) {
            Ok(instance) => instance,
            Err(e) => {
                shared.drop_instance(instance_id);
                return Err(HarnessError::Instantiate(format!("{e:#}")));
            }
        };
        let root_context_id = b.root_context_id;
        let mut plugin = Plugin {
            store,
            instance,
            harness,
            root_context_id,
            next_context_id: root_context_id.wrapping_add(1).max(1),
            failed: false,
        };
        let memory = plugin
            .instance
            .get_memory(&mut plugin.store, "memory")
            .ok_or_else(|| HarnessError::MissingExport("memory".into()))?;
        let allocator = ["proxy_on_memory_allocate", "malloc"]
            .into_iter()
            .find_map(|name| {
                plugin
                    .instance
                    .get_typed_func::<i32, i32>(&mut plugin.store, name)
                    .ok()
            });
        let data = plugin.store.data_mut();
        data.memory = Some(memory);
        data.allocator = allocator;

        // A reactor needs `_initialize` once (it runs the SDK's `main!` block);
        // `main` is never called, as in Envoy for ABI 0.2.x.
        for init in ["_initialize", "_start"] {
            if plugin.has_export(init) {
                plugin.call::<(), ()>(init, 0, ())?;
                break;
            }
        }
        plugin.create_root(root_context_id, &b.root_id, &b.plugin_name, b.configuration)?;
        Ok(plugin)
    }

    fn has_export(&mut self, name: &str) -> bool {
        self.instance.get_func(&mut self.store, name).is_some()
    }

    /// Calls an export with `context` as the current (and effective) context.
    /// A missing export is `Ok(None)` (Envoy skips callbacks a module lacks).
    pub(crate) fn call<P, R>(
        &mut self,
        export: &str,
        context: u32,
        params: P,
    ) -> Result<Option<R>, HarnessError>
    where
        P: WasmParams,
        R: WasmResults,
    {
        if self.failed {
            return Err(HarnessError::VmFailed);
        }
        let Some(func) = self.instance.get_func(&mut self.store, export) else {
            return Ok(None);
        };
        let typed = func
            .typed::<P, R>(&self.store)
            .map_err(|e| HarnessError::BadExport {
                name: export.to_string(),
                reason: format!("{e:#}"),
            })?;
        let data = self.store.data_mut();
        data.current_context = context;
        data.effective_context = context;
        let log_mark = data.logs.len();
        match typed.call(&mut self.store, params) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                self.failed = true;
                Err(self.trap_error(export, context, &e, log_mark))
            }
        }
    }

    /// Builds the Trap error: the trap reason plus what the guest said at
    /// Error/Critical level during the call (the SDK's panic hook logs the
    /// panic message at Critical; std writes it to stderr, logged at Error).
    fn trap_error(
        &self,
        export: &str,
        context: u32,
        err: &wasmtime::Error,
        log_mark: usize,
    ) -> HarnessError {
        let reason = match err.downcast_ref::<wasmtime::Trap>() {
            Some(trap) => trap.to_string(),
            None => err.root_cause().to_string(),
        };
        let said: Vec<&str> = self
            .store
            .data()
            .logs
            .get(log_mark..)
            .unwrap_or_default()
            .iter()
            .filter(|l| l.level >= LogLevel::Error)
            .map(|l| l.message.trim())
            .collect();
        let message = if said.is_empty() {
            reason
        } else {
            format!("{reason}; guest said: {}", said.join(" | "))
        };
        HarnessError::Trap {
            context: format!("{export}(context {context})"),
            message,
        }
    }

    fn allocate_context_id(&mut self) -> u32 {
        loop {
            let id = self.next_context_id;
            self.next_context_id = self.next_context_id.wrapping_add(1).max(1);
            if !self.store.data().contexts.contains_key(&id) {
                return id;
            }
        }
    }

    fn create_root(
        &mut self,
        ctx: u32,
        root_id: &str,
        plugin_name: &str,
        configuration: Vec<u8>,
    ) -> Result<(), HarnessError> {
        if self.store.data().contexts.contains_key(&ctx) {
            return Err(HarnessError::Usage(format!(
                "context id {ctx} is already in use"
            )));
        }
        let mut properties = PropertyMap::default();
        properties.set(vec!["plugin_root_id".into()], root_id.as_bytes().to_vec());
        properties.set(vec!["plugin_name".into()], plugin_name.as_bytes().to_vec());
        self.store.data_mut().contexts.insert(
            ctx,
            Context::Root(RootState {
                configuration,
                properties,
                ..RootState::default()
            }),
        );
        self.call::<(i32, i32), ()>("proxy_on_context_create", ctx, (ctx as i32, 0))?;
        let vm_config_len = size_arg(self.store.data().vm_configuration.len());
        // Envoy lets on_vm_start read the plugin configuration too.
        self.store.data_mut().plugin_config_visible = Some(ctx);
        let started =
            self.call::<(i32, i32), i32>("proxy_on_vm_start", ctx, (ctx as i32, vm_config_len));
        self.store.data_mut().plugin_config_visible = None;
        let started = started?.is_none_or(|v| v != 0);
        if let Some(root) = self.store.data_mut().root_mut(ctx) {
            root.vm_started = started;
        }
        // Envoy does not configure a plugin whose VM failed to start.
        if started {
            self.configure_root(ctx)?;
        }
        Ok(())
    }

    fn configure_root(&mut self, ctx: u32) -> Result<bool, HarnessError> {
        let len = match self.store.data().contexts.get(&ctx) {
            Some(Context::Root(r)) => r.configuration.len(),
            _ => {
                return Err(HarnessError::UnknownContext {
                    kind: "root",
                    id: ctx,
                });
            }
        };
        self.store.data_mut().plugin_config_visible = Some(ctx);
        let result =
            self.call::<(i32, i32), i32>("proxy_on_configure", ctx, (ctx as i32, size_arg(len)));
        self.store.data_mut().plugin_config_visible = None;
        let configured = result?.is_none_or(|v| v != 0);
        if let Some(root) = self.store.data_mut().root_mut(ctx) {
            root.configured = configured;
        }
        Ok(configured)
    }

    fn root(&self, ctx: u32) -> Option<&RootState> {
        match self.store.data().contexts.get(&ctx) {
            Some(Context::Root(r)) => Some(r),
            _ => None,
        }
    }

    /// The harness this VM came from (for starting sibling VMs or reading shared data).
    pub fn harness(&self) -> &Harness {
        &self.harness
    }

    /// The VM id given to the builder.
    pub fn vm_id(&self) -> &str {
        &self.store.data().vm_id
    }

    /// The id of the first root context (1 unless configured).
    pub fn root_context_id(&self) -> u32 {
        self.root_context_id
    }

    /// What `proxy_on_vm_start` returned for the first root (true when the module lacks it).
    pub fn vm_started(&self) -> bool {
        self.root(self.root_context_id)
            .is_some_and(|r| r.vm_started)
    }

    /// What `proxy_on_configure` last returned for the first root (false when
    /// it was never called because `proxy_on_vm_start` returned false).
    pub fn configured(&self) -> bool {
        self.root(self.root_context_id)
            .is_some_and(|r| r.configured)
    }

    /// `(vm_started, configured)` of any root context of this VM.
    pub fn root_status(&self, root_context_id: u32) -> Option<(bool, bool)> {
        self.root(root_context_id)
            .map(|r| (r.vm_started, r.configured))
    }

    /// Delivers a new plugin configuration to the first root (an xDS update)
    /// and returns what `proxy_on_configure` answered (false = NACK).
    pub fn reconfigure(&mut self, bytes: impl Into<Vec<u8>>) -> Result<bool, HarnessError> {
        self.reconfigure_root(self.root_context_id, bytes)
    }

    /// Like [`Plugin::reconfigure`] for any root context.
    pub fn reconfigure_root(
        &mut self,
        root_context_id: u32,
        bytes: impl Into<Vec<u8>>,
    ) -> Result<bool, HarnessError> {
        let root = self.store.data_mut().root_mut(root_context_id).ok_or(
            HarnessError::UnknownContext {
                kind: "root",
                id: root_context_id,
            },
        )?;
        root.configuration = bytes.into();
        self.configure_root(root_context_id)
    }

    /// Creates another root context in this VM, as Envoy does when several
    /// plugins (different `root_id`s) share one `vm_id`, and starts and
    /// configures it. Returns its context id.
    pub fn add_root_context(
        &mut self,
        root_id: &str,
        configuration: impl Into<Vec<u8>>,
    ) -> Result<u32, HarnessError> {
        if self.failed {
            return Err(HarnessError::VmFailed);
        }
        let ctx = self.allocate_context_id();
        let plugin_name = self
            .root(self.root_context_id)
            .and_then(|r| r.properties.get(&["plugin_name".to_string()]))
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        self.create_root(ctx, root_id, &plugin_name, configuration.into())?;
        Ok(ctx)
    }

    /// Sets a VM-level property (visible to every context unless a stream overrides it).
    pub fn set_property(&mut self, path: &[&str], value: impl Into<Vec<u8>>) {
        self.store
            .data_mut()
            .properties
            .set(property::owned_path(path), value.into());
    }

    /// A property as the first root context sees it (root, then VM level),
    /// including values the guest set outside a stream.
    pub fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.store
            .data()
            .property_in(self.root_context_id, &property::owned_path(path))
    }

    /// Runs a whole HTTP exchange through the filter: request headers (body,
    /// trailers), then the "upstream" response, then `proxy_on_log`,
    /// `proxy_on_done` and `proxy_on_delete`.
    ///
    /// The exchange stops early (no response phase) when the filter sends a
    /// local response, resets the stream, or pauses the request without resuming
    /// it; drive such flows with [`Plugin::http_stream`] instead.
    pub fn http_request(&mut self, req: HttpRequest) -> Result<HttpExchange, HarnessError> {
        let mut stream = self.http_stream_for(&req)?;
        let (request_action, response_action) = run_exchange(&mut stream, &req)?;
        let context_id = stream.context_id();
        let state = stream.finish_state()?;
        Ok(HttpExchange::from_state(
            context_id,
            state,
            request_action,
            response_action,
        ))
    }

    /// Creates an HTTP context on the first root for step-by-step driving.
    /// Dropping the stream without [`HttpStream::finish`] still finishes it
    /// (best effort).
    pub fn http_stream(&mut self) -> Result<HttpStream<'_>, HarnessError> {
        let root = self.root_context_id;
        let ctx = self.new_stream(root, &[])?;
        Ok(HttpStream::new(self, ctx))
    }

    /// Creates an HTTP context with the stream properties (and root context)
    /// of `req`; its headers and bodies are not sent, drive them yourself.
    pub fn http_stream_for(&mut self, req: &HttpRequest) -> Result<HttpStream<'_>, HarnessError> {
        let root = req.root_context.unwrap_or(self.root_context_id);
        let ctx = self.new_stream(root, &req.properties)?;
        Ok(HttpStream::new(self, ctx))
    }

    fn new_stream(
        &mut self,
        root: u32,
        props: &[(Vec<String>, Vec<u8>)],
    ) -> Result<u32, HarnessError> {
        if self.failed {
            return Err(HarnessError::VmFailed);
        }
        if self.root(root).is_none() {
            return Err(HarnessError::UnknownContext {
                kind: "root",
                id: root,
            });
        }
        let ctx = self.allocate_context_id();
        let mut properties = default_stream_properties(ctx);
        for (path, value) in props {
            properties.set(path.clone(), value.clone());
        }
        self.store.data_mut().contexts.insert(
            ctx,
            Context::Http(Box::new(StreamState::new(root, properties))),
        );
        self.call::<(i32, i32), ()>("proxy_on_context_create", ctx, (ctx as i32, root as i32))?;
        Ok(ctx)
    }

    pub(crate) fn stream(&self, ctx: u32) -> Option<&StreamState> {
        match self.store.data().contexts.get(&ctx) {
            Some(Context::Http(s)) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn stream_mut(&mut self, ctx: u32) -> Result<&mut StreamState, HarnessError> {
        match self.store.data_mut().contexts.get_mut(&ctx) {
            Some(Context::Http(s)) => Ok(s),
            _ => Err(HarnessError::UnknownContext {
                kind: "HTTP",
                id: ctx,
            }),
        }
    }

    /// Delivers headers or trailers for one direction and runs its callback.
    pub(crate) fn deliver_map(
        &mut self,
        ctx: u32,
        part: Part,
        map: HeaderMap,
        end_of_stream: bool,
    ) -> Result<Action, HarnessError> {
        let s = self.stream_mut(ctx)?;
        let n = size_arg(map.len());
        s.local_response_in_call = false;
        let export = match part {
            Part::RequestHeaders => {
                s.request_headers = Some(map);
                s.access.request_headers = true;
                s.request_end_of_stream = end_of_stream;
                "proxy_on_request_headers"
            }
            Part::RequestTrailers => {
                s.request_trailers = Some(map);
                s.access.request_trailers = true;
                s.request_end_of_stream = true;
                "proxy_on_request_trailers"
            }
            Part::ResponseHeaders => {
                s.response_headers = Some(map);
                s.access.response_headers = true;
                s.response_end_of_stream = end_of_stream;
                "proxy_on_response_headers"
            }
            Part::ResponseTrailers => {
                s.response_trailers = Some(map);
                s.access.response_trailers = true;
                s.response_end_of_stream = true;
                "proxy_on_response_trailers"
            }
            Part::RequestBody | Part::ResponseBody => {
                return Err(HarnessError::Usage("a body is not a header map".into()));
            }
        };
        let raw = match part {
            Part::RequestTrailers | Part::ResponseTrailers => {
                self.call::<(i32, i32), i32>(export, ctx, (ctx as i32, n))?
            }
            _ => self.call::<(i32, i32, i32), i32>(
                export,
                ctx,
                (ctx as i32, n, i32::from(end_of_stream)),
            )?,
        };
        self.settle(ctx, part, raw)
    }

    /// Delivers a body chunk for one direction. While the filter keeps the body
    /// buffered (returned Pause), new chunks are appended and the callback sees
    /// the whole buffer, like Envoy's StopIterationAndBuffer.
    pub(crate) fn deliver_body(
        &mut self,
        ctx: u32,
        part: Part,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> Result<Action, HarnessError> {
        let s = self.stream_mut(ctx)?;
        s.local_response_in_call = false;
        let (export, size) = match part {
            Part::RequestBody => {
                if !s.access.request_body {
                    s.request_body.clear();
                }
                s.request_body.extend_from_slice(chunk);
                s.access.request_body = true;
                s.request_end_of_stream = end_of_stream;
                ("proxy_on_request_body", s.request_body.len())
            }
            Part::ResponseBody => {
                if !s.access.response_body {
                    s.response_body.clear();
                }
                s.response_body.extend_from_slice(chunk);
                s.access.response_body = true;
                s.response_end_of_stream = end_of_stream;
                ("proxy_on_response_body", s.response_body.len())
            }
            _ => return Err(HarnessError::Usage("not a body".into())),
        };
        let raw = self.call::<(i32, i32, i32), i32>(
            export,
            ctx,
            (ctx as i32, size_arg(size), i32::from(end_of_stream)),
        )?;
        self.settle(ctx, part, raw)
    }

    /// Turns the callback's return value into an Action and withdraws the
    /// guest's access to what it let through.
    fn settle(&mut self, ctx: u32, part: Part, raw: Option<i32>) -> Result<Action, HarnessError> {
        let s = self.stream_mut(ctx)?;
        let mut action = raw.map_or(Action::Continue, Action::from_raw);
        if mem::take(&mut s.local_response_in_call) {
            // Envoy stops iteration after a local response, whatever was returned.
            action = Action::Pause;
        }
        if action == Action::Continue {
            match part {
                Part::RequestHeaders => s.access.request_headers = false,
                Part::RequestTrailers => s.access.request_trailers = false,
                Part::ResponseHeaders => s.access.response_headers = false,
                Part::ResponseTrailers => s.access.response_trailers = false,
                Part::RequestBody => {
                    s.access.request_body = false;
                    let body = mem::take(&mut s.request_body);
                    s.request_body_sent.extend(body);
                }
                Part::ResponseBody => {
                    s.access.response_body = false;
                    let body = mem::take(&mut s.response_body);
                    s.response_body_sent.extend(body);
                }
            }
        }
        Ok(action)
    }

    /// `proxy_on_log`, `proxy_on_done`, `proxy_on_delete`, then forgets the
    /// context and returns its final state.
    pub(crate) fn finish_stream(&mut self, ctx: u32) -> Result<StreamState, HarnessError> {
        let s = self.stream_mut(ctx)?;
        s.access = Access {
            log_phase: true,
            ..Access::default()
        };
        self.call::<i32, ()>("proxy_on_log", ctx, ctx as i32)?;
        self.stream_mut(ctx)?.access.log_phase = false;
        self.call::<i32, i32>("proxy_on_done", ctx, ctx as i32)?;
        self.call::<i32, ()>("proxy_on_delete", ctx, ctx as i32)?;
        match self.store.data_mut().contexts.remove(&ctx) {
            Some(Context::Http(s)) => Ok(*s),
            _ => Err(HarnessError::UnknownContext {
                kind: "HTTP",
                id: ctx,
            }),
        }
    }

    /// Calls `proxy_on_tick` on the first root.
    pub fn tick(&mut self) -> Result<(), HarnessError> {
        self.tick_root(self.root_context_id)
    }

    /// Calls `proxy_on_tick` on any root context; its next timer tick is
    /// rescheduled one period from now.
    pub fn tick_root(&mut self, root_context_id: u32) -> Result<(), HarnessError> {
        let now = self.harness.clock().now_nanos();
        let root = self.store.data_mut().root_mut(root_context_id).ok_or(
            HarnessError::UnknownContext {
                kind: "root",
                id: root_context_id,
            },
        )?;
        if let Some(period) = root.tick_period {
            root.next_tick_nanos = Some(now.saturating_add(duration_nanos(period)));
        }
        self.call::<i32, ()>("proxy_on_tick", root_context_id, root_context_id as i32)?;
        Ok(())
    }

    /// The tick period the first root set (None if never set or set to 0).
    pub fn tick_period(&self) -> Option<Duration> {
        self.root(self.root_context_id).and_then(|r| r.tick_period)
    }

    /// The tick period of any root context.
    pub fn root_tick_period(&self, root_context_id: u32) -> Option<Duration> {
        self.root(root_context_id).and_then(|r| r.tick_period)
    }

    /// Advances the shared clock by `d`, firing `proxy_on_tick` on every root of
    /// this VM as often as its period elapsed (in time order, with the clock set
    /// to each tick's due time), and returns how many ticks fired.
    pub fn advance_and_tick(&mut self, d: Duration) -> Result<u32, HarnessError> {
        if self.failed {
            return Err(HarnessError::VmFailed);
        }
        let clock = self.harness.clock();
        let target = clock.now_nanos().saturating_add(duration_nanos(d));
        let mut fired = 0u32;
        loop {
            let due = self
                .store
                .data()
                .contexts
                .iter()
                .filter_map(|(id, c)| match c {
                    Context::Root(r) if r.tick_period.is_some() => {
                        r.next_tick_nanos.map(|t| (t, *id))
                    }
                    _ => None,
                })
                .filter(|(t, _)| *t <= target)
                .min();
            let Some((at, root_id)) = due else { break };
            clock.advance_to_nanos(at);
            if let Some(root) = self.store.data_mut().root_mut(root_id) {
                let period = root.tick_period.map_or(u64::MAX, duration_nanos);
                root.next_tick_nanos = Some(at.saturating_add(period.max(1)));
            }
            self.call::<i32, ()>("proxy_on_tick", root_id, root_id as i32)?;
            fired += 1;
        }
        clock.advance_to_nanos(target);
        Ok(fired)
    }

    /// Every HTTP call the guest dispatched so far (answered or not).
    pub fn http_calls(&self) -> Vec<HttpCall> {
        self.store.data().http_calls.clone()
    }

    /// Like [`Plugin::http_calls`], and forgets them (pending ones can still be answered).
    pub fn take_http_calls(&mut self) -> Vec<HttpCall> {
        mem::take(&mut self.store.data_mut().http_calls)
    }

    /// Tokens of HTTP calls that were dispatched and not yet answered.
    pub fn pending_http_calls(&self) -> Vec<u32> {
        self.store
            .data()
            .pending_http_calls
            .keys()
            .copied()
            .collect()
    }

    /// Answers a dispatched HTTP call: sets the call-response headers and body
    /// and calls `proxy_on_http_call_response(root, token, headers, body_size, 0)`.
    pub fn respond_to_http_call(
        &mut self,
        token: u32,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), HarnessError> {
        self.respond_to_http_call_with_trailers(token, headers, body, &[])
    }

    /// Like [`Plugin::respond_to_http_call`], with response trailers.
    pub fn respond_to_http_call_with_trailers(
        &mut self,
        token: u32,
        headers: &[(&str, &str)],
        body: &[u8],
        trailers: &[(&str, &str)],
    ) -> Result<(), HarnessError> {
        let response = CallResponse {
            headers: HeaderMap::from_pairs(headers),
            body: body.to_vec(),
            trailers: HeaderMap::from_pairs(trailers),
        };
        self.deliver_http_call(token, Some(response))
    }

    /// Fails a dispatched HTTP call (reset, timeout): like Envoy, calls back with
    /// 0 headers, 0 body bytes and no response maps available.
    pub fn fail_http_call(&mut self, token: u32) -> Result<(), HarnessError> {
        self.deliver_http_call(token, None)
    }

    fn deliver_http_call(
        &mut self,
        token: u32,
        response: Option<CallResponse>,
    ) -> Result<(), HarnessError> {
        if self.failed {
            return Err(HarnessError::VmFailed);
        }
        let root = self
            .store
            .data_mut()
            .pending_http_calls
            .remove(&token)
            .ok_or(HarnessError::UnknownHttpCall(token))?;
        let (nh, nb, nt) = response.as_ref().map_or((0, 0, 0), |r| {
            (
                size_arg(r.headers.len()),
                size_arg(r.body.len()),
                size_arg(r.trailers.len()),
            )
        });
        let data = self.store.data_mut();
        if response.is_none() {
            // What Envoy's onHttpCallFailure reports through proxy_get_status.
            data.call_status = Some((Status::BrokenConnection.code() as u32, "reset".into()));
        }
        data.http_call_response = response;
        let result = self.call::<(i32, i32, i32, i32, i32), ()>(
            "proxy_on_http_call_response",
            root,
            (root as i32, token as i32, nh, nb, nt),
        );
        let data = self.store.data_mut();
        data.http_call_response = None;
        data.call_status = None;
        result.map(|_| ())
    }

    /// Delivers the `proxy_on_queue_ready` notifications pending for queues this
    /// VM owns, oldest first, and returns how many were delivered.
    ///
    /// Enqueueing never calls the owner directly (each VM has its own store,
    /// and Envoy posts the notification to the owner's thread too), so tests
    /// call this on the owning Plugin. Notifications caused while delivering
    /// wait for the next call.
    pub fn deliver_queue_notifications(&mut self) -> Result<u32, HarnessError> {
        if self.failed {
            return Err(HarnessError::VmFailed);
        }
        let notes = self
            .harness
            .shared()
            .take_notifications(self.store.data().instance_id);
        let mut delivered = 0;
        for note in notes {
            if self.root(note.context_id).is_none() {
                continue;
            }
            self.call::<(i32, i32), ()>(
                "proxy_on_queue_ready",
                note.context_id,
                (note.context_id as i32, note.token as i32),
            )?;
            delivered += 1;
        }
        Ok(delivered)
    }

    /// How many queue notifications wait for [`Plugin::deliver_queue_notifications`].
    pub fn pending_queue_notifications(&self) -> usize {
        self.harness
            .shared()
            .pending_notifications(self.store.data().instance_id)
    }

    /// Every captured log message (including WASI stdout/stderr lines).
    pub fn logs(&self) -> Vec<LogEntry> {
        self.store.data().logs.clone()
    }

    /// Like [`Plugin::logs`], and forgets them.
    pub fn take_logs(&mut self) -> Vec<LogEntry> {
        mem::take(&mut self.store.data_mut().logs)
    }

    /// Whether any captured log message contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.store
            .data()
            .logs
            .iter()
            .any(|l| l.message.contains(needle))
    }

    /// Changes the level `proxy_get_log_level` reports and the capture threshold.
    pub fn set_log_level(&mut self, level: LogLevel) {
        self.store.data_mut().log_level = level;
    }

    /// Everything the guest wrote to WASI stdout.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.store.data().stdout).into_owned()
    }

    /// Everything the guest wrote to WASI stderr (Rust panic messages land here).
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.store.data().stderr).into_owned()
    }

    /// A counter or gauge by name (histograms: see [`Plugin::metric_records`]).
    pub fn metric(&self, name: &str) -> Option<i64> {
        let m = &self.store.data().metrics;
        m.counters
            .get(name)
            .map(|c| i64::try_from(*c).unwrap_or(i64::MAX))
            .or_else(|| m.gauges.get(name).copied())
    }

    /// All counters and gauges by name.
    pub fn metrics(&self) -> BTreeMap<String, i64> {
        let m = &self.store.data().metrics;
        m.counters
            .iter()
            .map(|(k, v)| (k.clone(), i64::try_from(*v).unwrap_or(i64::MAX)))
            .chain(m.gauges.iter().map(|(k, v)| (k.clone(), *v)))
            .collect()
    }

    /// Values recorded into a histogram, in order; None if no such histogram.
    pub fn metric_records(&self, name: &str) -> Option<Vec<u64>> {
        self.store.data().metrics.histograms.get(name).cloned()
    }

    /// gRPC calls and streams the guest started (never answered by the harness).
    pub fn grpc_calls(&self) -> Vec<GrpcCall> {
        self.store.data().grpc_calls.clone()
    }

    /// Foreign function calls the guest made (all answered NotFound).
    pub fn foreign_calls(&self) -> Vec<ForeignCall> {
        self.store.data().foreign_calls.clone()
    }

    /// Upstream clusters known to `proxy_http_call`.
    pub fn clusters(&self) -> BTreeSet<String> {
        self.store.data().clusters.clone()
    }

    /// Adds an upstream cluster after start (e.g. a CDS update).
    pub fn add_cluster(&mut self, name: &str) {
        self.store.data_mut().clusters.insert(name.to_string());
    }

    /// Whether the guest trapped; a failed VM accepts no more calls.
    pub fn failed(&self) -> bool {
        self.failed
    }
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Whether the exchange cannot go on after a callback in `direction`.
fn stopped(stream: &HttpStream<'_>, action: Action, direction: crate::abi::StreamType) -> bool {
    let Some(s) = stream.state() else { return true };
    s.local_response.is_some()
        || !s.closed.is_empty()
        || (action == Action::Pause && !s.continued.contains(&direction))
}

fn run_exchange(
    stream: &mut HttpStream<'_>,
    req: &HttpRequest,
) -> Result<(Action, Option<Action>), HarnessError> {
    use crate::abi::StreamType::{HttpRequest as Req, HttpResponse as Resp};
    let has_body = !req.body.is_empty();
    let has_trailers = !req.trailers.is_empty();
    let headers = HeaderMap::from_pairs(&as_refs(&req.headers));
    let request_action =
        stream.deliver(Part::RequestHeaders, headers, !has_body && !has_trailers)?;
    if stopped(stream, request_action, Req) {
        return Ok((request_action, None));
    }
    if has_body {
        let a = stream.deliver_body(Part::RequestBody, &req.body, !has_trailers)?;
        if stopped(stream, a, Req) {
            return Ok((request_action, None));
        }
    }
    if has_trailers {
        let a = stream.deliver(
            Part::RequestTrailers,
            HeaderMap::from_pairs(&as_refs(&req.trailers)),
            true,
        )?;
        if stopped(stream, a, Req) {
            return Ok((request_action, None));
        }
    }
    let response_headers = if req.response_headers.is_empty() {
        HeaderMap::from_pairs(&[(":status", "200")])
    } else {
        HeaderMap::from_pairs(&as_refs(&req.response_headers))
    };
    let has_body = !req.response_body.is_empty();
    let has_trailers = !req.response_trailers.is_empty();
    let response_action = stream.deliver(
        Part::ResponseHeaders,
        response_headers,
        !has_body && !has_trailers,
    )?;
    if stopped(stream, response_action, Resp) {
        return Ok((request_action, Some(response_action)));
    }
    if has_body {
        let a = stream.deliver_body(Part::ResponseBody, &req.response_body, !has_trailers)?;
        if stopped(stream, a, Resp) {
            return Ok((request_action, Some(response_action)));
        }
    }
    if has_trailers {
        stream.deliver(
            Part::ResponseTrailers,
            HeaderMap::from_pairs(&as_refs(&req.response_trailers)),
            true,
        )?;
    }
    Ok((request_action, Some(response_action)))
}

fn as_refs(pairs: &[(String, String)]) -> Vec<(&str, &str)> {
    pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}
