//! Builds small proxy-wasm guests in WebAssembly text for the integration tests.
//!
//! Every guest gets the same prelude: the ABI imports it may call, a bump
//! allocator exported as `proxy_on_memory_allocate`, the ABI version export,
//! and helpers:
//! - `$log (ptr len)` logs bytes at Info;
//! - `$log_out` logs the value a host call returned through the out-pointers
//!   at 0x100 (pointer) and 0x104 (size);
//! - `$st (code)` logs `st=NN` for a status code.
//!
//! Scratch memory: 0x100 out-pointer, 0x104 out-size, 0x108 cas/token,
//! 0x110 u64 out-value, 0x120.. metric ids, 0x200 `$st` text, 0x1000.. data
//! segments, 0x10000.. heap.

#![allow(dead_code, reason = "each test file uses a different subset")]

use meshvm_harness::Harness;

const PRELUDE: &str = r#"
  (import "env" "proxy_log" (func $proxy_log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_hv (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_hv (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $rep_hv (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $rem_hv (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $get_prop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_property" (func $set_prop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_shared_data" (func $get_sd (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set_sd (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $reg_q (param i32 i32 i32) (result i32)))
  (import "env" "proxy_resolve_shared_queue" (func $res_q (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $enq (param i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $deq (param i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $set_buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $set_tick (param i32) (result i32)))
  (import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))
  (import "env" "proxy_define_metric" (func $def_metric (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $inc_metric (param i32 i64) (result i32)))
  (import "env" "proxy_record_metric" (func $rec_metric (param i32 i64) (result i32)))
  (import "env" "proxy_send_local_response" (func $send_local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $set_effective (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 0x10000))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap
      (i32.add (global.get $heap)
        (i32.and (i32.add (local.get $size) (i32.const 7)) (i32.const -8))))
    (local.get $p))
  (func $log (param $ptr i32) (param $len i32)
    (drop (call $proxy_log (i32.const 2) (local.get $ptr) (local.get $len))))
  (func $log_out
    (call $log (i32.load (i32.const 0x100)) (i32.load (i32.const 0x104))))
  (func $st (param $code i32)
    (i32.store8 (i32.const 0x200) (i32.const 0x73))
    (i32.store8 (i32.const 0x201) (i32.const 0x74))
    (i32.store8 (i32.const 0x202) (i32.const 0x3d))
    (i32.store8 (i32.const 0x203)
      (i32.add (i32.const 48) (i32.div_u (local.get $code) (i32.const 10))))
    (i32.store8 (i32.const 0x204)
      (i32.add (i32.const 48) (i32.rem_u (local.get $code) (i32.const 10))))
    (call $log (i32.const 0x200) (i32.const 5)))
"#;

/// Collects data segments and hands out `(i32.const OFF) (i32.const LEN)` arguments.
pub struct Guest {
    data: Vec<(u32, Vec<u8>)>,
    next: u32,
}

impl Default for Guest {
    fn default() -> Self {
        Self::new()
    }
}

impl Guest {
    pub fn new() -> Self {
        Self {
            data: Vec::new(),
            next: 0x1000,
        }
    }

    /// Places bytes in memory; returns the WAT arguments `ptr len`.
    pub fn bytes(&mut self, b: &[u8]) -> String {
        let offset = self.next;
        self.data.push((offset, b.to_vec()));
        self.next += (b.len() as u32 + 8) & !7;
        format!("(i32.const {offset}) (i32.const {})", b.len())
    }

    /// Places bytes in memory; returns their offset and length.
    pub fn place(&mut self, b: &[u8]) -> (u32, u32) {
        let offset = self.next;
        self.bytes(b);
        (offset, b.len() as u32)
    }

    /// Places a string in memory; returns the WAT arguments `ptr len`.
    pub fn s(&mut self, text: &str) -> String {
        self.bytes(text.as_bytes())
    }

    /// The full module text around `body` (exports and extra globals).
    pub fn wat(&self, body: &str) -> String {
        let mut out = String::from("(module\n");
        out.push_str(PRELUDE);
        out.push_str(body);
        for (offset, bytes) in &self.data {
            let escaped: String = bytes.iter().map(|b| format!("\\{b:02x}")).collect();
            out.push_str(&format!("\n  (data (i32.const {offset}) \"{escaped}\")"));
        }
        out.push_str("\n)\n");
        out
    }

    /// Compiles the module and loads it into a Harness.
    pub fn harness(&self, body: &str) -> Harness {
        let text = self.wat(body);
        let wasm = wat::parse_str(&text).unwrap_or_else(|e| panic!("bad WAT: {e}\n{text}"));
        Harness::from_bytes(&wasm).expect("module loads")
    }
}

/// The log messages of a plugin, in order.
pub fn messages(plugin: &meshvm_harness::Plugin) -> Vec<String> {
    plugin.logs().into_iter().map(|l| l.message).collect()
}
