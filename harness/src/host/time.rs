//! Time: the Harness's fake clock and per-root tick periods.

use std::time::Duration;

use wasmtime::{Caller, Linker};

use super::ENV;
use crate::abi::Status;
use crate::memory::{self, HostResult, reply};
use crate::state::HostState;

pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_get_current_time_nanoseconds",
        |mut c: Caller<'_, HostState>, time_ptr: i32| {
            let now = c.data().shared.clock.now_nanos();
            reply(memory::write_u64(&mut c, time_ptr, now).map_err(Into::into))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_tick_period_milliseconds",
        |mut c: Caller<'_, HostState>, period: i32| reply(set_tick_period(&mut c, period)),
    )?;
    Ok(())
}

/// Sets the tick period of the effective context's root; 0 disables ticks.
fn set_tick_period(c: &mut Caller<'_, HostState>, period_ms: i32) -> HostResult {
    let state = c.data_mut();
    let now = state.shared.clock.now_nanos();
    let root = state
        .root_of(state.effective_context)
        .ok_or(Status::BadArgument)?;
    let root = state.root_mut(root).ok_or(Status::BadArgument)?;
    let period_ms = u64::from(period_ms as u32);
    if period_ms == 0 {
        root.tick_period = None;
        root.next_tick_nanos = None;
    } else {
        root.tick_period = Some(Duration::from_millis(period_ms));
        root.next_tick_nanos = Some(now.saturating_add(period_ms * 1_000_000));
    }
    Ok(())
}
