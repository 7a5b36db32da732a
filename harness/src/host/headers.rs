//! Header maps: request/response headers and trailers, HTTP call response
//! headers and trailers.
//!
//! As in Envoy, a stream's map is only available while its callback runs (or
//! while the filter keeps that direction paused); otherwise reads of a value and
//! all writes give BadArgument, and reading all pairs gives an empty map. In
//! `proxy_on_log` headers are readable, not writable, and a missing map reads
//! as NotFound.

use wasmtime::{Caller, Linker};

use super::ENV;
use crate::abi::{MapType, Status};
use crate::header_map::HeaderMap;
use crate::memory::{self, HostResult, reply};
use crate::state::HostState;

pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_get_header_map_pairs",
        |mut c: Caller<'_, HostState>, ty: i32, ptr_ptr: i32, size_ptr: i32| {
            reply(get_pairs(&mut c, ty, ptr_ptr, size_ptr))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_header_map_pairs",
        |mut c: Caller<'_, HostState>, ty: i32, ptr: i32, len: i32| {
            reply(set_pairs(&mut c, ty, ptr, len))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_header_map_value",
        |mut c: Caller<'_, HostState>,
         ty: i32,
         key_ptr: i32,
         key_len: i32,
         ptr_ptr: i32,
         size_ptr: i32| {
            reply(get_value(&mut c, ty, key_ptr, key_len, ptr_ptr, size_ptr))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_add_header_map_value",
        |mut c: Caller<'_, HostState>,
         ty: i32,
         key_ptr: i32,
         key_len: i32,
         v_ptr: i32,
         v_len: i32| {
            reply(modify(
                &mut c,
                ty,
                key_ptr,
                key_len,
                Some((v_ptr, v_len)),
                Op::Add,
            ))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_replace_header_map_value",
        |mut c: Caller<'_, HostState>,
         ty: i32,
         key_ptr: i32,
         key_len: i32,
         v_ptr: i32,
         v_len: i32| {
            reply(modify(
                &mut c,
                ty,
                key_ptr,
                key_len,
                Some((v_ptr, v_len)),
                Op::Replace,
            ))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_remove_header_map_value",
        |mut c: Caller<'_, HostState>, ty: i32, key_ptr: i32, key_len: i32| {
            reply(modify(&mut c, ty, key_ptr, key_len, None, Op::Remove))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_header_map_size",
        |mut c: Caller<'_, HostState>, ty: i32, size_ptr: i32| {
            reply(get_size(&mut c, ty, size_ptr))
        },
    )?;
    Ok(())
}

/// Why a map could not be read.
enum Unavailable {
    /// Not available now: BadArgument for a value read.
    Now,
    /// Absent in the access-log phase: NotFound for a value read.
    InLog,
}

fn readable(state: &HostState, ty: MapType) -> Result<&HeaderMap, Unavailable> {
    match ty {
        MapType::HttpCallResponseHeaders => {
            return state
                .http_call_response
                .as_ref()
                .map(|r| &r.headers)
                .ok_or(Unavailable::Now);
        }
        MapType::HttpCallResponseTrailers => {
            return state
                .http_call_response
                .as_ref()
                .map(|r| &r.trailers)
                .ok_or(Unavailable::Now);
        }
        MapType::GrpcReceiveInitialMetadata | MapType::GrpcReceiveTrailingMetadata => {
            return Err(Unavailable::Now);
        }
        _ => {}
    }
    let Some(s) = state.effective_stream() else {
        return Err(Unavailable::Now);
    };
    let a = s.access;
    let (map, live, in_log) = match ty {
        MapType::HttpRequestHeaders => (s.request_headers.as_ref(), a.request_headers, true),
        MapType::HttpRequestTrailers => (s.request_trailers.as_ref(), a.request_trailers, false),
        MapType::HttpResponseHeaders => (s.response_headers.as_ref(), a.response_headers, true),
        MapType::HttpResponseTrailers => (s.response_trailers.as_ref(), a.response_trailers, true),
        _ => (None, false, false),
    };
    if a.log_phase {
        return if in_log {
            map.ok_or(Unavailable::InLog)
        } else {
            Err(Unavailable::InLog)
        };
    }
    if live {
        map.ok_or(Unavailable::Now)
    } else {
        Err(Unavailable::Now)
    }
}

/// The map the guest may modify now, or None (BadArgument).
fn writable(state: &mut HostState, ty: MapType) -> Option<&mut HeaderMap> {
    let s = state.effective_stream_mut()?;
    let a = s.access;
    if a.log_phase {
        return None;
    }
    match ty {
        MapType::HttpRequestHeaders if a.request_headers => s.request_headers.as_mut(),
        MapType::HttpResponseHeaders if a.response_headers => s.response_headers.as_mut(),
        // Envoy adds trailers on demand in the last body callback.
        MapType::HttpRequestTrailers
            if a.request_trailers || (a.request_body && s.request_end_of_stream) =>
        {
            Some(s.request_trailers.get_or_insert_with(HeaderMap::default))
        }
        MapType::HttpResponseTrailers
            if a.response_trailers || (a.response_body && s.response_end_of_stream) =>
        {
            Some(s.response_trailers.get_or_insert_with(HeaderMap::default))
        }
        _ => None,
    }
}

fn map_type(ty: i32) -> Result<MapType, Status> {
    MapType::from_raw(ty).ok_or(Status::BadArgument)
}

fn get_pairs(c: &mut Caller<'_, HostState>, ty: i32, ptr_ptr: i32, size_ptr: i32) -> HostResult {
    let ty = map_type(ty)?;
    let encoded = match readable(c.data(), ty) {
        Ok(map) if !map.is_empty() => map.encode(),
        _ => Vec::new(),
    };
    memory::copy_out(c, &encoded, ptr_ptr, size_ptr)
}

fn set_pairs(c: &mut Caller<'_, HostState>, ty: i32, ptr: i32, len: i32) -> HostResult {
    let ty = map_type(ty)?;
    let bytes = memory::read(c, ptr, len)?;
    let new = HeaderMap::decode(&bytes).ok_or(Status::BadArgument)?;
    let map = writable(c.data_mut(), ty).ok_or(Status::BadArgument)?;
    *map = new;
    Ok(())
}

fn get_value(
    c: &mut Caller<'_, HostState>,
    ty: i32,
    key_ptr: i32,
    key_len: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> HostResult {
    let ty = map_type(ty)?;
    let key = memory::read(c, key_ptr, key_len)?;
    let value = match readable(c.data(), ty) {
        Ok(map) => map.get(&key).map(<[u8]>::to_vec).ok_or(Status::NotFound)?,
        Err(Unavailable::InLog) => return Err(Status::NotFound.into()),
        Err(Unavailable::Now) => return Err(Status::BadArgument.into()),
    };
    memory::copy_out(c, &value, ptr_ptr, size_ptr)
}

enum Op {
    Add,
    Replace,
    Remove,
}

fn modify(
    c: &mut Caller<'_, HostState>,
    ty: i32,
    key_ptr: i32,
    key_len: i32,
    value: Option<(i32, i32)>,
    op: Op,
) -> HostResult {
    let ty = map_type(ty)?;
    let key = memory::read(c, key_ptr, key_len)?;
    let value = match value {
        Some((ptr, len)) => memory::read(c, ptr, len)?,
        None => Vec::new(),
    };
    let map = writable(c.data_mut(), ty).ok_or(Status::BadArgument)?;
    match op {
        Op::Add => map.add(&key, &value),
        Op::Replace => map.replace(&key, &value),
        Op::Remove => map.remove(&key),
    }
    Ok(())
}

fn get_size(c: &mut Caller<'_, HostState>, ty: i32, size_ptr: i32) -> HostResult {
    let ty = map_type(ty)?;
    let size = writable(c.data_mut(), ty)
        .map(|m| m.byte_size())
        .ok_or(Status::BadArgument)?;
    memory::write_u32(c, size_ptr, u32::try_from(size).unwrap_or(u32::MAX))?;
    Ok(())
}
