//! Context plumbing: `proxy_set_effective_context`, `proxy_done`,
//! `proxy_call_foreign_function` (recorded, always NotFound) and the ABI 0.1
//! `proxy_get_configuration`.

use wasmtime::{Caller, Linker};

use super::ENV;
use crate::abi::Status;
use crate::memory::{self, HostResult, reply};
use crate::records::ForeignCall;
use crate::state::{Context, HostState};

pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_set_effective_context",
        |mut c: Caller<'_, HostState>, context_id: i32| {
            let state = c.data_mut();
            let id = context_id as u32;
            if !state.contexts.contains_key(&id) {
                return reply(Err(Status::BadArgument.into()));
            }
            state.effective_context = id;
            reply(Ok(()))
        },
    )?;
    linker.func_wrap(ENV, "proxy_done", |mut c: Caller<'_, HostState>| {
        c.data_mut().done_calls += 1;
        reply(Ok(()))
    })?;
    linker.func_wrap(
        ENV,
        "proxy_call_foreign_function",
        |mut c: Caller<'_, HostState>,
         name_ptr: i32,
         name_len: i32,
         args_ptr: i32,
         args_len: i32,
         _results_ptr: i32,
         _results_size_ptr: i32| {
            reply(call_foreign_function(
                &mut c, name_ptr, name_len, args_ptr, args_len,
            ))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_configuration",
        |mut c: Caller<'_, HostState>, ptr_ptr: i32, size_ptr: i32| {
            reply(get_configuration(&mut c, ptr_ptr, size_ptr))
        },
    )?;
    Ok(())
}

fn call_foreign_function(
    c: &mut Caller<'_, HostState>,
    name_ptr: i32,
    name_len: i32,
    args_ptr: i32,
    args_len: i32,
) -> HostResult {
    let name = memory::read_string(c, name_ptr, name_len)?;
    let arguments = memory::read(c, args_ptr, args_len)?;
    c.data_mut()
        .foreign_calls
        .push(ForeignCall { name, arguments });
    Err(Status::NotFound.into())
}

/// ABI 0.1: the plugin configuration during vm_start/configure, else the VM's.
fn get_configuration(c: &mut Caller<'_, HostState>, ptr_ptr: i32, size_ptr: i32) -> HostResult {
    let state = c.data();
    let value = match state
        .plugin_config_visible
        .and_then(|r| state.contexts.get(&r))
    {
        Some(Context::Root(r)) => r.configuration.clone(),
        _ => state.vm_configuration.clone(),
    };
    memory::copy_out(c, &value, ptr_ptr, size_ptr)
}
