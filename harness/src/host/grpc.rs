//! gRPC calls and streams: recorded with tokens so guests that use them keep
//! working, but never answered (the harness emulates no gRPC upstream).
//! `proxy_get_status` reports code 0 with an empty message, except during the
//! callback of a failed HTTP call (BrokenConnection, "reset"), as in Envoy.

use std::time::Duration;

use wasmtime::{Caller, Linker};

use super::ENV;
use crate::abi::Status;
use crate::header_map::HeaderMap;
use crate::memory::{self, HostResult, reply};
use crate::records::GrpcCall;
use crate::state::HostState;

pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_grpc_call",
        |mut c: Caller<'_, HostState>,
         svc_ptr: i32,
         svc_len: i32,
         name_ptr: i32,
         name_len: i32,
         method_ptr: i32,
         method_len: i32,
         md_ptr: i32,
         md_len: i32,
         msg_ptr: i32,
         msg_len: i32,
         timeout_ms: i32,
         token_ptr: i32| {
            reply(start(
                &mut c,
                [
                    (svc_ptr, svc_len),
                    (name_ptr, name_len),
                    (method_ptr, method_len),
                    (md_ptr, md_len),
                ],
                Some(((msg_ptr, msg_len), timeout_ms)),
                token_ptr,
            ))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_grpc_stream",
        |mut c: Caller<'_, HostState>,
         svc_ptr: i32,
         svc_len: i32,
         name_ptr: i32,
         name_len: i32,
         method_ptr: i32,
         method_len: i32,
         md_ptr: i32,
         md_len: i32,
         token_ptr: i32| {
            reply(start(
                &mut c,
                [
                    (svc_ptr, svc_len),
                    (name_ptr, name_len),
                    (method_ptr, method_len),
                    (md_ptr, md_len),
                ],
                None,
                token_ptr,
            ))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_grpc_send",
        |mut c: Caller<'_, HostState>, token: i32, ptr: i32, len: i32, _end_stream: i32| {
            reply(send(&mut c, token, ptr, len))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_grpc_cancel",
        |mut c: Caller<'_, HostState>, token: i32| reply(close(&mut c, token)),
    )?;
    linker.func_wrap(
        ENV,
        "proxy_grpc_close",
        |mut c: Caller<'_, HostState>, token: i32| reply(close(&mut c, token)),
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_status",
        |mut c: Caller<'_, HostState>, code_ptr: i32, ptr_ptr: i32, size_ptr: i32| {
            reply(get_status(&mut c, code_ptr, ptr_ptr, size_ptr))
        },
    )?;
    Ok(())
}

type Span = (i32, i32);

fn start(
    c: &mut Caller<'_, HostState>,
    [service, name, method, metadata]: [Span; 4],
    unary: Option<(Span, i32)>,
    token_ptr: i32,
) -> HostResult {
    let service = memory::read(c, service.0, service.1)?;
    let service_name = memory::read_string(c, name.0, name.1)?;
    let method = memory::read_string(c, method.0, method.1)?;
    let metadata = memory::read(c, metadata.0, metadata.1)?;
    let (message, timeout_ms) = match unary {
        Some((msg, timeout)) => (memory::read(c, msg.0, msg.1)?, timeout as u32),
        None => (Vec::new(), 0),
    };
    memory::write_u32(c, token_ptr, 0)?;
    let state = c.data_mut();
    // A plain cluster name must be known; Envoy answers ParseFailure otherwise.
    let cluster = String::from_utf8_lossy(&service).into_owned();
    if !state.clusters.contains(&cluster) {
        return Err(Status::ParseFailure.into());
    }
    let initial_metadata = HeaderMap::decode(&metadata)
        .ok_or(Status::BadArgument)?
        .to_strings();
    state.last_grpc_token = state.last_grpc_token.wrapping_add(1).max(1);
    let token = state.last_grpc_token;
    state.grpc_calls.push(GrpcCall {
        token,
        service,
        service_name,
        method,
        initial_metadata,
        message,
        timeout: Duration::from_millis(u64::from(timeout_ms)),
        stream: unary.is_none(),
        sent: Vec::new(),
        closed: false,
    });
    memory::write_u32(c, token_ptr, token)?;
    Ok(())
}

fn send(c: &mut Caller<'_, HostState>, token: i32, ptr: i32, len: i32) -> HostResult {
    let message = memory::read(c, ptr, len)?;
    let call = c
        .data_mut()
        .grpc_calls
        .iter_mut()
        .find(|g| g.token == token as u32 && g.stream && !g.closed)
        .ok_or(Status::NotFound)?;
    call.sent.push(message);
    Ok(())
}

fn close(c: &mut Caller<'_, HostState>, token: i32) -> HostResult {
    let call = c
        .data_mut()
        .grpc_calls
        .iter_mut()
        .find(|g| g.token == token as u32 && !g.closed)
        .ok_or(Status::NotFound)?;
    call.closed = true;
    Ok(())
}

fn get_status(
    c: &mut Caller<'_, HostState>,
    code_ptr: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> HostResult {
    let (code, message) = c.data().call_status.clone().unwrap_or_default();
    memory::write_u32(c, code_ptr, code)?;
    memory::copy_out(c, message.as_bytes(), ptr_ptr, size_ptr)
}
