//! Shared data (CAS) and shared queues, backed by the Harness-wide
//! [`crate::shared::SharedState`] so VMs of one Harness see each other.

use wasmtime::{Caller, Linker};

use super::ENV;
use crate::abi::Status;
use crate::memory::{self, HostResult, reply};
use crate::shared::QueueOwner;
use crate::state::HostState;

pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_get_shared_data",
        |mut c: Caller<'_, HostState>,
         key_ptr: i32,
         key_len: i32,
         ptr_ptr: i32,
         size_ptr: i32,
         cas_ptr: i32| {
            reply(get_shared_data(
                &mut c, key_ptr, key_len, ptr_ptr, size_ptr, cas_ptr,
            ))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_shared_data",
        |mut c: Caller<'_, HostState>,
         key_ptr: i32,
         key_len: i32,
         v_ptr: i32,
         v_len: i32,
         cas: i32| { reply(set_shared_data(&mut c, key_ptr, key_len, v_ptr, v_len, cas)) },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_register_shared_queue",
        |mut c: Caller<'_, HostState>, name_ptr: i32, name_len: i32, token_ptr: i32| {
            reply(register_queue(&mut c, name_ptr, name_len, token_ptr))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_resolve_shared_queue",
        |mut c: Caller<'_, HostState>,
         vm_ptr: i32,
         vm_len: i32,
         name_ptr: i32,
         name_len: i32,
         token_ptr: i32| {
            reply(resolve_queue(
                &mut c, vm_ptr, vm_len, name_ptr, name_len, token_ptr,
            ))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_enqueue_shared_queue",
        |mut c: Caller<'_, HostState>, token: i32, ptr: i32, len: i32| {
            reply(enqueue(&mut c, token, ptr, len))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_dequeue_shared_queue",
        |mut c: Caller<'_, HostState>, token: i32, ptr_ptr: i32, size_ptr: i32| {
            reply(dequeue(&mut c, token, ptr_ptr, size_ptr))
        },
    )?;
    Ok(())
}

fn get_shared_data(
    c: &mut Caller<'_, HostState>,
    key_ptr: i32,
    key_len: i32,
    ptr_ptr: i32,
    size_ptr: i32,
    cas_ptr: i32,
) -> HostResult {
    let key = memory::read_string(c, key_ptr, key_len)?;
    let state = c.data();
    let (value, cas) = state
        .shared
        .get_data(&state.vm_id, &key)
        .ok_or(Status::NotFound)?;
    memory::copy_out(c, &value, ptr_ptr, size_ptr)?;
    memory::write_u32(c, cas_ptr, cas)?;
    Ok(())
}

fn set_shared_data(
    c: &mut Caller<'_, HostState>,
    key_ptr: i32,
    key_len: i32,
    v_ptr: i32,
    v_len: i32,
    cas: i32,
) -> HostResult {
    let key = memory::read_string(c, key_ptr, key_len)?;
    let value = memory::read(c, v_ptr, v_len)?;
    let state = c.data();
    state
        .shared
        .set_data(&state.vm_id, &key, value, cas as u32)?;
    Ok(())
}

fn register_queue(
    c: &mut Caller<'_, HostState>,
    name_ptr: i32,
    name_len: i32,
    token_ptr: i32,
) -> HostResult {
    let name = memory::read_string(c, name_ptr, name_len)?;
    let state = c.data();
    // on_queue_ready goes to the root context of whoever registered.
    let context_id = state
        .root_of(state.effective_context)
        .unwrap_or(state.effective_context);
    let owner = QueueOwner {
        instance: state.instance_id,
        context_id,
    };
    let token = state.shared.register_queue(&state.vm_id, &name, owner);
    memory::write_u32(c, token_ptr, token)?;
    Ok(())
}

fn resolve_queue(
    c: &mut Caller<'_, HostState>,
    vm_ptr: i32,
    vm_len: i32,
    name_ptr: i32,
    name_len: i32,
    token_ptr: i32,
) -> HostResult {
    let vm_id = memory::read_string(c, vm_ptr, vm_len)?;
    let name = memory::read_string(c, name_ptr, name_len)?;
    let token = c
        .data()
        .shared
        .resolve_queue(&vm_id, &name)
        .ok_or(Status::NotFound)?;
    memory::write_u32(c, token_ptr, token)?;
    Ok(())
}

fn enqueue(c: &mut Caller<'_, HostState>, token: i32, ptr: i32, len: i32) -> HostResult {
    let value = memory::read(c, ptr, len)?;
    c.data().shared.enqueue(token as u32, value)?;
    Ok(())
}

fn dequeue(c: &mut Caller<'_, HostState>, token: i32, ptr_ptr: i32, size_ptr: i32) -> HostResult {
    let value = c.data().shared.dequeue(token as u32)?;
    memory::copy_out(c, &value, ptr_ptr, size_ptr)
}
