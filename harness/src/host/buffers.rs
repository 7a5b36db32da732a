//! Buffers: request/response bodies, HTTP call response body, VM and plugin
//! configuration.
//!
//! Availability follows Envoy: the plugin configuration only during
//! `proxy_on_vm_start`/`proxy_on_configure`, the call response body only during
//! `proxy_on_http_call_response`, a body only during its callback (or while the
//! filter keeps it buffered); an absent body reads as empty.

use wasmtime::{Caller, Linker};

use super::ENV;
use crate::abi::{BufferType, Status};
use crate::memory::{self, HostResult, addr, reply};
use crate::state::{Context, HostState};

pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_get_buffer_bytes",
        |mut c: Caller<'_, HostState>,
         ty: i32,
         start: i32,
         max: i32,
         ptr_ptr: i32,
         size_ptr: i32| {
            reply(get_buffer_bytes(&mut c, ty, start, max, ptr_ptr, size_ptr))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_buffer_status",
        |mut c: Caller<'_, HostState>, ty: i32, len_ptr: i32, flags_ptr: i32| {
            reply(get_buffer_status(&mut c, ty, len_ptr, flags_ptr))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_buffer_bytes",
        |mut c: Caller<'_, HostState>, ty: i32, start: i32, size: i32, ptr: i32, len: i32| {
            reply(set_buffer_bytes(&mut c, ty, start, size, ptr, len))
        },
    )?;
    Ok(())
}

/// The buffer's current bytes, or NotFound when Envoy would have none.
fn buffer(state: &HostState, ty: BufferType) -> Result<Vec<u8>, Status> {
    match ty {
        BufferType::HttpRequestBody => Ok(state
            .effective_stream()
            .filter(|s| s.access.request_body)
            .map(|s| s.request_body.clone())
            .unwrap_or_default()),
        BufferType::HttpResponseBody => Ok(state
            .effective_stream()
            .filter(|s| s.access.response_body)
            .map(|s| s.response_body.clone())
            .unwrap_or_default()),
        BufferType::HttpCallResponseBody => state
            .http_call_response
            .as_ref()
            .map(|r| r.body.clone())
            .ok_or(Status::NotFound),
        BufferType::VmConfiguration => Ok(state.vm_configuration.clone()),
        BufferType::PluginConfiguration => {
            let root = state.plugin_config_visible.ok_or(Status::NotFound)?;
            match state.contexts.get(&root) {
                Some(Context::Root(r)) => Ok(r.configuration.clone()),
                _ => Err(Status::NotFound),
            }
        }
        _ => Err(Status::NotFound),
    }
}

fn get_buffer_bytes(
    c: &mut Caller<'_, HostState>,
    ty: i32,
    start: i32,
    max: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> HostResult {
    let ty = BufferType::from_raw(ty).ok_or(Status::BadArgument)?;
    let data = buffer(c.data(), ty)?;
    // Reading past the end is not an error: Envoy returns what is there (maybe nothing).
    let start = addr(start).min(data.len());
    let len = addr(max).min(data.len() - start);
    memory::copy_out(c, &data[start..start + len], ptr_ptr, size_ptr)
}

fn get_buffer_status(
    c: &mut Caller<'_, HostState>,
    ty: i32,
    len_ptr: i32,
    flags_ptr: i32,
) -> HostResult {
    let ty = BufferType::from_raw(ty).ok_or(Status::BadArgument)?;
    let len = buffer(c.data(), ty)?.len();
    memory::write_u32(c, len_ptr, u32::try_from(len).unwrap_or(u32::MAX))?;
    memory::write_u32(c, flags_ptr, 0)?;
    Ok(())
}

/// Envoy's `copyFrom` semantics: `start == 0 && size == 0` prepends,
/// `start == 0 && size >= len` replaces, `start >= len` appends; anything else
/// (a splice in the middle) is BadArgument.
pub(crate) fn splice(
    buffer: &mut Vec<u8>,
    start: usize,
    size: usize,
    data: &[u8],
) -> Result<(), Status> {
    if start == 0 {
        if size == 0 {
            buffer.splice(0..0, data.iter().copied());
            Ok(())
        } else if size >= buffer.len() {
            *buffer = data.to_vec();
            Ok(())
        } else {
            Err(Status::BadArgument)
        }
    } else if start >= buffer.len() {
        buffer.extend_from_slice(data);
        Ok(())
    } else {
        Err(Status::BadArgument)
    }
}

fn set_buffer_bytes(
    c: &mut Caller<'_, HostState>,
    ty: i32,
    start: i32,
    size: i32,
    ptr: i32,
    len: i32,
) -> HostResult {
    let ty = BufferType::from_raw(ty).ok_or(Status::BadArgument)?;
    let data = memory::read(c, ptr, len)?;
    let stream = c.data_mut().effective_stream_mut();
    let target = match (ty, stream) {
        (BufferType::HttpRequestBody, Some(s)) if s.access.request_body => &mut s.request_body,
        (BufferType::HttpResponseBody, Some(s)) if s.access.response_body => &mut s.response_body,
        (BufferType::HttpRequestBody | BufferType::HttpResponseBody, _) => {
            return Err(Status::NotFound.into());
        }
        _ => return Err(Status::BadArgument.into()),
    };
    splice(target, addr(start), addr(size), &data)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_follows_envoy() {
        let mut b = b"world".to_vec();
        splice(&mut b, 0, 0, b"hello ").expect("prepend");
        assert_eq!(b, b"hello world");
        splice(&mut b, 11, 0, b"!").expect("append");
        assert_eq!(b, b"hello world!");
        splice(&mut b, 0, 100, b"new").expect("replace");
        assert_eq!(b, b"new");
        assert_eq!(splice(&mut b, 1, 1, b"x"), Err(Status::BadArgument));
        assert_eq!(splice(&mut b, 0, 1, b"x"), Err(Status::BadArgument));
    }
}
