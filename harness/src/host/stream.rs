//! Stream control: `proxy_continue_stream`, `proxy_close_stream`,
//! `proxy_send_local_response`, plus the ABI 0.1 names some SDKs still import
//! (`proxy_continue_request`, `proxy_continue_response`, `proxy_clear_route_cache`).

use std::mem;

use wasmtime::{Caller, Linker};

use super::ENV;
use crate::abi::{Status, StreamType};
use crate::header_map::HeaderMap;
use crate::memory::{self, HostResult, reply};
use crate::records::LocalResponse;
use crate::state::HostState;

pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_continue_stream",
        |mut c: Caller<'_, HostState>, ty: i32| reply(continue_stream(&mut c, ty)),
    )?;
    linker.func_wrap(
        ENV,
        "proxy_close_stream",
        |mut c: Caller<'_, HostState>, ty: i32| reply(close_stream(&mut c, ty)),
    )?;
    linker.func_wrap(
        ENV,
        "proxy_continue_request",
        |mut c: Caller<'_, HostState>| reply(continue_stream(&mut c, 0)),
    )?;
    linker.func_wrap(
        ENV,
        "proxy_continue_response",
        |mut c: Caller<'_, HostState>| reply(continue_stream(&mut c, 1)),
    )?;
    linker.func_wrap(
        ENV,
        "proxy_clear_route_cache",
        |_c: Caller<'_, HostState>| reply(Ok(())),
    )?;
    linker.func_wrap(
        ENV,
        "proxy_send_local_response",
        |mut c: Caller<'_, HostState>,
         status: i32,
         details_ptr: i32,
         details_len: i32,
         body_ptr: i32,
         body_len: i32,
         headers_ptr: i32,
         headers_len: i32,
         grpc_status: i32| {
            reply(send_local_response(
                &mut c,
                status,
                (details_ptr, details_len),
                (body_ptr, body_len),
                (headers_ptr, headers_len),
                grpc_status,
            ))
        },
    )?;
    Ok(())
}

/// Records the resume; the direction's maps and buffered body are handed on
/// (so the guest loses access to them, as in Envoy).
fn continue_stream(c: &mut Caller<'_, HostState>, ty: i32) -> HostResult {
    let ty = StreamType::from_raw(ty).ok_or(Status::BadArgument)?;
    if ty == StreamType::Upstream {
        return Err(Status::Unimplemented.into());
    }
    if let Some(s) = c.data_mut().effective_stream_mut() {
        s.continued.push(ty);
        match ty {
            StreamType::HttpRequest => {
                s.access.request_headers = false;
                s.access.request_body = false;
                s.access.request_trailers = false;
                let body = mem::take(&mut s.request_body);
                s.request_body_sent.extend(body);
            }
            StreamType::HttpResponse => {
                s.access.response_headers = false;
                s.access.response_body = false;
                s.access.response_trailers = false;
                let body = mem::take(&mut s.response_body);
                s.response_body_sent.extend(body);
            }
            _ => {}
        }
    }
    Ok(())
}

fn close_stream(c: &mut Caller<'_, HostState>, ty: i32) -> HostResult {
    let ty = StreamType::from_raw(ty).ok_or(Status::BadArgument)?;
    if let Some(s) = c.data_mut().effective_stream_mut() {
        s.closed.push(ty);
    }
    Ok(())
}

fn send_local_response(
    c: &mut Caller<'_, HostState>,
    status: i32,
    (details_ptr, details_len): (i32, i32),
    (body_ptr, body_len): (i32, i32),
    (headers_ptr, headers_len): (i32, i32),
    grpc_status: i32,
) -> HostResult {
    let details = memory::read_string(c, details_ptr, details_len)?;
    let body = memory::read(c, body_ptr, body_len)?;
    let headers = memory::read(c, headers_ptr, headers_len)?;
    // Envoy reads malformed pairs as no headers.
    let headers = HeaderMap::decode(&headers).unwrap_or_default().to_strings();
    // Outside a stream (e.g. from a root context) Envoy ignores the call.
    if let Some(s) = c.data_mut().effective_stream_mut() {
        s.local_response = Some(LocalResponse {
            status: status as u32,
            details,
            body,
            headers,
            grpc_status,
        });
        s.local_response_in_call = true;
    }
    Ok(())
}
