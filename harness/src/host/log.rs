//! `proxy_log` and `proxy_get_log_level`: captured per VM for assertions.

use wasmtime::{Caller, Linker};

use super::ENV;
use crate::abi::{LogLevel, Status};
use crate::memory::{self, HostResult, reply};
use crate::state::HostState;

pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_log",
        |mut c: Caller<'_, HostState>, level: i32, ptr: i32, len: i32| {
            reply(log(&mut c, level, ptr, len))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_log_level",
        |mut c: Caller<'_, HostState>, level_ptr: i32| {
            let level = c.data().log_level.code();
            reply(memory::write_u32(&mut c, level_ptr, level).map_err(Into::into))
        },
    )?;
    Ok(())
}

fn log(c: &mut Caller<'_, HostState>, level: i32, ptr: i32, len: i32) -> HostResult {
    let level = LogLevel::from_raw(level).ok_or(Status::BadArgument)?;
    let message = memory::read_string(c, ptr, len)?;
    c.data_mut().log(level, message);
    Ok(())
}
