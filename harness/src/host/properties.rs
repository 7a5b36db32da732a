//! `proxy_get_property` / `proxy_set_property` over the property tree (stream,
//! then root, then VM; see [`crate::state::HostState::property`]).

use wasmtime::{Caller, Linker};

use super::ENV;
use crate::abi::Status;
use crate::memory::{self, HostResult, reply};
use crate::property::split_path;
use crate::state::HostState;

pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_get_property",
        |mut c: Caller<'_, HostState>,
         path_ptr: i32,
         path_len: i32,
         ptr_ptr: i32,
         size_ptr: i32| {
            reply(get_property(&mut c, path_ptr, path_len, ptr_ptr, size_ptr))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_property",
        |mut c: Caller<'_, HostState>, path_ptr: i32, path_len: i32, v_ptr: i32, v_len: i32| {
            reply(set_property(&mut c, path_ptr, path_len, v_ptr, v_len))
        },
    )?;
    Ok(())
}

fn get_property(
    c: &mut Caller<'_, HostState>,
    path_ptr: i32,
    path_len: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> HostResult {
    let path = split_path(&memory::read(c, path_ptr, path_len)?);
    let value = c.data().property(&path).ok_or(Status::NotFound)?;
    memory::copy_out(c, &value, ptr_ptr, size_ptr)
}

fn set_property(
    c: &mut Caller<'_, HostState>,
    path_ptr: i32,
    path_len: i32,
    v_ptr: i32,
    v_len: i32,
) -> HostResult {
    let path = split_path(&memory::read(c, path_ptr, path_len)?);
    let value = memory::read(c, v_ptr, v_len)?;
    if path.is_empty() {
        return Err(Status::BadArgument.into());
    }
    c.data_mut().set_property(path, value);
    Ok(())
}
