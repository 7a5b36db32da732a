//! `proxy_http_call` (the SDK's `dispatch_http_call`): validated like Envoy
//! (known cluster, `:method`, `:path` and `:authority` present, timeout ≥ 0),
//! recorded, and answered later by the test.

use std::time::Duration;

use wasmtime::{Caller, Linker};

use super::ENV;
use crate::abi::Status;
use crate::header_map::HeaderMap;
use crate::memory::{self, HostResult, reply};
use crate::records::HttpCall;
use crate::state::HostState;

pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_http_call",
        |mut c: Caller<'_, HostState>,
         upstream_ptr: i32,
         upstream_len: i32,
         headers_ptr: i32,
         headers_len: i32,
         body_ptr: i32,
         body_len: i32,
         trailers_ptr: i32,
         trailers_len: i32,
         timeout_ms: i32,
         token_ptr: i32| {
            reply(http_call(
                &mut c,
                [
                    (upstream_ptr, upstream_len),
                    (headers_ptr, headers_len),
                    (body_ptr, body_len),
                    (trailers_ptr, trailers_len),
                ],
                timeout_ms,
                token_ptr,
            ))
        },
    )?;
    Ok(())
}

fn http_call(
    c: &mut Caller<'_, HostState>,
    [upstream, headers, body, trailers]: [(i32, i32); 4],
    timeout_ms: i32,
    token_ptr: i32,
) -> HostResult {
    let cluster = memory::read_string(c, upstream.0, upstream.1)?;
    let headers = memory::read(c, headers.0, headers.1)?;
    let body = memory::read(c, body.0, body.1)?;
    let trailers = memory::read(c, trailers.0, trailers.1)?;
    // Like Envoy, check the out-pointer before starting anything.
    memory::write_u32(c, token_ptr, 0)?;
    if timeout_ms < 0 {
        return Err(Status::BadArgument.into());
    }
    let state = c.data_mut();
    if !state.clusters.contains(&cluster) {
        return Err(Status::BadArgument.into());
    }
    let headers = HeaderMap::decode(&headers).ok_or(Status::BadArgument)?;
    let trailers = HeaderMap::decode(&trailers).ok_or(Status::BadArgument)?;
    for required in [":method", ":path", ":authority"] {
        if headers.get(required.as_bytes()).is_none() {
            return Err(Status::BadArgument.into());
        }
    }
    state.last_http_token = state.last_http_token.wrapping_add(1).max(1);
    let token = state.last_http_token;
    let context_id = state.effective_context;
    // Envoy makes the call on the root context and calls it back there.
    let root = state.root_of(context_id).unwrap_or(context_id);
    state.pending_http_calls.insert(token, root);
    state.http_calls.push(HttpCall {
        token,
        cluster,
        headers: headers.to_strings(),
        body,
        trailers: trailers.to_strings(),
        timeout: Duration::from_millis(u64::from(timeout_ms as u32)),
        context_id,
    });
    memory::write_u32(c, token_ptr, token)?;
    Ok(())
}
