//! Calibration module for bench/filter: the smallest proxy-wasm (ABI 0.2.1)
//! HTTP filter that Envoy will load. It exports the same per-stream callbacks
//! as a filter built with the Rust SDK (so Envoy makes the same calls into
//! V8 per request) and does nothing in them: every callback returns at once,
//! headers and bodies continue. Its cost over "no filter" is the floor that
//! Envoy's Wasm plumbing on V8 puts under any proxy-wasm filter.
//!
//! Built by run.sh without Cargo (no dependencies):
//!   rustc --target wasm32-wasip1 --crate-type cdylib -C opt-level=3 \
//!         -C panic=abort noop.rs -o noop.wasm
#![no_std]

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

const CONTINUE: u32 = 0;
const OK: u32 = 1;

// Envoy requires an allocator export; nothing here ever asks the host for
// data, so a tiny bump allocator over a static arena is enough.
static mut ARENA: [u8; 65536] = [0; 65536];
static mut NEXT: usize = 0;

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    unsafe {
        let start = (NEXT + 7) & !7;
        if start + size > 65536 {
            NEXT = 0;
            return core::ptr::null_mut();
        }
        NEXT = start + size;
        (&raw mut ARENA as *mut u8).add(start)
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_abi_version_0_2_1() {}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_vm_start(_root: u32, _size: u32) -> u32 { OK }
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_configure(_root: u32, _size: u32) -> u32 { OK }
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_context_create(_ctx: u32, _parent: u32) {}
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_request_headers(_ctx: u32, _n: u32, _eos: u32) -> u32 { CONTINUE }
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_request_body(_ctx: u32, _size: u32, _eos: u32) -> u32 { CONTINUE }
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_request_trailers(_ctx: u32, _n: u32) -> u32 { CONTINUE }
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_response_headers(_ctx: u32, _n: u32, _eos: u32) -> u32 { CONTINUE }
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_response_body(_ctx: u32, _size: u32, _eos: u32) -> u32 { CONTINUE }
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_response_trailers(_ctx: u32, _n: u32) -> u32 { CONTINUE }
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_log(_ctx: u32) {}
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_done(_ctx: u32) -> u32 { OK }
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_delete(_ctx: u32) {}
