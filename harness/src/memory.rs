//! Guest memory access for host functions.
//!
//! Every guest pointer is bounds-checked; a bad one gives `InvalidMemoryAccess`
//! (never a host panic). Host→guest data goes through the guest's allocator
//! (`proxy_on_memory_allocate`, else `malloc`); because that call may grow the
//! memory, views are always fetched again after it.

use wasmtime::{Caller, Extern, Memory};

use crate::abi::Status;
use crate::state::HostState;

/// Why a host function did not return `Ok`.
#[derive(Debug)]
pub(crate) enum HostError {
    /// Return this status to the guest.
    Status(Status),
    /// Trap the guest (e.g. the allocator trapped, or `proc_exit`).
    Trap(wasmtime::Error),
}

impl From<Status> for HostError {
    fn from(s: Status) -> Self {
        Self::Status(s)
    }
}

impl From<wasmtime::Error> for HostError {
    fn from(e: wasmtime::Error) -> Self {
        Self::Trap(e)
    }
}

/// Result of a host function body.
pub(crate) type HostResult<T = ()> = Result<T, HostError>;

/// Converts a host function body's result into the status returned to the guest.
pub(crate) fn reply(result: HostResult) -> wasmtime::Result<i32> {
    match result {
        Ok(()) => Ok(Status::Ok.code()),
        Err(HostError::Status(s)) => Ok(s.code()),
        Err(HostError::Trap(e)) => Err(e),
    }
}

type Ctx<'a, 'b> = &'a mut Caller<'b, HostState>;

fn memory(caller: Ctx<'_, '_>) -> Result<Memory, Status> {
    if let Some(m) = caller.data().memory {
        return Ok(m);
    }
    caller
        .get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or(Status::InvalidMemoryAccess)
}

/// Guest pointers and sizes arrive as i32 (wasm32 `usize`); they are unsigned.
pub(crate) fn addr(raw: i32) -> usize {
    raw as u32 as usize
}

fn range(ptr: i32, len: usize, mem_len: usize) -> Result<std::ops::Range<usize>, Status> {
    let start = addr(ptr);
    let end = start.checked_add(len).ok_or(Status::InvalidMemoryAccess)?;
    if end > mem_len {
        return Err(Status::InvalidMemoryAccess);
    }
    Ok(start..end)
}

/// Copies `len` bytes at `ptr` out of the guest.
pub(crate) fn read(caller: Ctx<'_, '_>, ptr: i32, len: i32) -> Result<Vec<u8>, Status> {
    let mem = memory(caller)?;
    let data = mem.data(&*caller);
    let r = range(ptr, addr(len), data.len())?;
    Ok(data[r].to_vec())
}

/// Reads a guest string (lossy UTF-8).
pub(crate) fn read_string(caller: Ctx<'_, '_>, ptr: i32, len: i32) -> Result<String, Status> {
    Ok(String::from_utf8_lossy(&read(caller, ptr, len)?).into_owned())
}

/// Reads a little-endian u32 at `ptr`.
pub(crate) fn read_u32(caller: Ctx<'_, '_>, ptr: i32) -> Result<u32, Status> {
    let bytes = read(caller, ptr, 4)?;
    let raw: [u8; 4] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| Status::InvalidMemoryAccess)?;
    Ok(u32::from_le_bytes(raw))
}

/// Writes `bytes` at `ptr`.
pub(crate) fn write(caller: Ctx<'_, '_>, ptr: i32, bytes: &[u8]) -> Result<(), Status> {
    let mem = memory(caller)?;
    let data = mem.data_mut(&mut *caller);
    let r = range(ptr, bytes.len(), data.len())?;
    data[r].copy_from_slice(bytes);
    Ok(())
}

/// Writes a little-endian u32 (a wasm32 pointer or size) at `ptr`.
pub(crate) fn write_u32(caller: Ctx<'_, '_>, ptr: i32, value: u32) -> Result<(), Status> {
    write(caller, ptr, &value.to_le_bytes())
}

/// Writes a little-endian u64 at `ptr`.
pub(crate) fn write_u64(caller: Ctx<'_, '_>, ptr: i32, value: u64) -> Result<(), Status> {
    write(caller, ptr, &value.to_le_bytes())
}

/// Gives `bytes` to the guest: allocates guest memory, copies the bytes in and
/// writes pointer and size to the out-pointers. Empty data writes 0/0 without
/// allocating, as proxy-wasm-cpp-host does (the SDK then sees "no value").
pub(crate) fn copy_out(
    caller: Ctx<'_, '_>,
    bytes: &[u8],
    ptr_ptr: i32,
    size_ptr: i32,
) -> HostResult {
    // Check the out-pointers first so a bad pointer does not leak an allocation.
    range(ptr_ptr, 4, memory(caller)?.data_size(&*caller))?;
    range(size_ptr, 4, memory(caller)?.data_size(&*caller))?;
    if bytes.is_empty() {
        write_u32(caller, ptr_ptr, 0)?;
        write_u32(caller, size_ptr, 0)?;
        return Ok(());
    }
    let size = u32::try_from(bytes.len()).map_err(|_| Status::InvalidMemoryAccess)?;
    let ptr = allocate(caller, size)?;
    write(caller, ptr, bytes)?;
    write_u32(caller, ptr_ptr, ptr as u32)?;
    write_u32(caller, size_ptr, size)?;
    Ok(())
}

/// Calls the guest allocator. A missing allocator or a trap inside it traps the
/// guest; a null result is an InvalidMemoryAccess.
pub(crate) fn allocate(caller: Ctx<'_, '_>, size: u32) -> HostResult<i32> {
    let Some(alloc) = caller.data().allocator.clone() else {
        return Err(HostError::Trap(wasmtime::Error::msg(
            "the module exports neither `proxy_on_memory_allocate` nor `malloc`, \
             so the host cannot pass data to it",
        )));
    };
    let ptr = alloc.call(&mut *caller, size as i32)?;
    if ptr == 0 {
        return Err(Status::InvalidMemoryAccess.into());
    }
    Ok(ptr)
}
