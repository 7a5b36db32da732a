//! The `wasi_snapshot_preview1` subset Envoy implements for proxy-wasm guests.
//!
//! stdout/stderr writes are captured (and logged at Info/Error, as Envoy does),
//! the environment comes from `PluginBuilder::env`, clocks read the fake clock,
//! `random_get` is deterministic, `proc_exit` traps. Any other WASI import traps
//! when called (`Linker::define_unknown_imports_as_traps`).

use wasmtime::{Caller, Linker};

use crate::abi::{LogLevel, Status, errno};
use crate::memory::{self, HostError, HostResult};
use crate::state::HostState;

const WASI: &str = "wasi_snapshot_preview1";

/// Maps a WASI body's result: memory errors are EFAULT, traps stay traps.
fn errno_reply(result: HostResult<i32>) -> wasmtime::Result<i32> {
    match result {
        Ok(code) => Ok(code),
        Err(HostError::Status(Status::InvalidMemoryAccess)) => Ok(errno::FAULT),
        Err(HostError::Status(_)) => Ok(errno::INVAL),
        Err(HostError::Trap(e)) => Err(e),
    }
}

pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        WASI,
        "environ_sizes_get",
        |mut c: Caller<'_, HostState>, count_ptr: i32, size_ptr: i32| {
            errno_reply(environ_sizes_get(&mut c, count_ptr, size_ptr))
        },
    )?;
    linker.func_wrap(
        WASI,
        "environ_get",
        |mut c: Caller<'_, HostState>, environ_ptr: i32, buf_ptr: i32| {
            errno_reply(environ_get(&mut c, environ_ptr, buf_ptr))
        },
    )?;
    linker.func_wrap(
        WASI,
        "args_sizes_get",
        |mut c: Caller<'_, HostState>, argc_ptr: i32, size_ptr: i32| {
            errno_reply((|| -> HostResult<i32> {
                memory::write_u32(&mut c, argc_ptr, 0)?;
                memory::write_u32(&mut c, size_ptr, 0)?;
                Ok(errno::SUCCESS)
            })())
        },
    )?;
    linker.func_wrap(
        WASI,
        "args_get",
        |_c: Caller<'_, HostState>, _argv: i32, _buf: i32| errno::SUCCESS,
    )?;
    linker.func_wrap(
        WASI,
        "fd_write",
        |mut c: Caller<'_, HostState>, fd: i32, iovs: i32, iovs_len: i32, nwritten_ptr: i32| {
            errno_reply(fd_write(&mut c, fd, iovs, iovs_len, nwritten_ptr))
        },
    )?;
    linker.func_wrap(
        WASI,
        "fd_read",
        |_c: Caller<'_, HostState>, _fd: i32, _iovs: i32, _len: i32, _nread: i32| errno::NOSYS,
    )?;
    linker.func_wrap(
        WASI,
        "fd_seek",
        |_c: Caller<'_, HostState>, fd: i32, _offset: i64, _whence: i32, _newoffset: i32| {
            if (0..=2).contains(&fd) {
                errno::SPIPE
            } else {
                errno::BADF
            }
        },
    )?;
    linker.func_wrap(WASI, "fd_close", |_c: Caller<'_, HostState>, _fd: i32| {
        errno::SUCCESS
    })?;
    linker.func_wrap(
        WASI,
        "fd_fdstat_get",
        |mut c: Caller<'_, HostState>, fd: i32, stat_ptr: i32| {
            if fd != 1 && fd != 2 {
                return Ok(errno::BADF);
            }
            // filetype, flags and rights_inheriting zero; rights_base FD_WRITE (64).
            let mut stat = [0u8; 24];
            stat[8] = 64;
            errno_reply(
                memory::write(&mut c, stat_ptr, &stat)
                    .map(|()| errno::SUCCESS)
                    .map_err(Into::into),
            )
        },
    )?;
    linker.func_wrap(
        WASI,
        "fd_prestat_get",
        |_c: Caller<'_, HostState>, _fd: i32, _ptr: i32| errno::BADF,
    )?;
    linker.func_wrap(
        WASI,
        "fd_prestat_dir_name",
        |_c: Caller<'_, HostState>, _fd: i32, _ptr: i32, _len: i32| errno::NOSYS,
    )?;
    linker.func_wrap(
        WASI,
        "path_open",
        |_c: Caller<'_, HostState>,
         _fd: i32,
         _dirflags: i32,
         _path: i32,
         _path_len: i32,
         _oflags: i32,
         _rights_base: i64,
         _rights_inheriting: i64,
         _fdflags: i32,
         _fd_ptr: i32| errno::NOENT,
    )?;
    linker.func_wrap(
        WASI,
        "clock_time_get",
        |mut c: Caller<'_, HostState>, clock_id: i32, _precision: i64, time_ptr: i32| {
            let clock = &c.data().shared.clock;
            let now = match clock_id {
                0 => clock.now_nanos(),
                1 => clock.monotonic_nanos(),
                _ => return Ok(errno::NOTSUP),
            };
            errno_reply(
                memory::write_u64(&mut c, time_ptr, now)
                    .map(|()| errno::SUCCESS)
                    .map_err(Into::into),
            )
        },
    )?;
    linker.func_wrap(
        WASI,
        "clock_res_get",
        |mut c: Caller<'_, HostState>, clock_id: i32, res_ptr: i32| {
            if !(0..=1).contains(&clock_id) {
                return Ok(errno::NOTSUP);
            }
            errno_reply(
                memory::write_u64(&mut c, res_ptr, 1)
                    .map(|()| errno::SUCCESS)
                    .map_err(Into::into),
            )
        },
    )?;
    linker.func_wrap(
        WASI,
        "random_get",
        |mut c: Caller<'_, HostState>, buf_ptr: i32, len: i32| {
            errno_reply(random_get(&mut c, buf_ptr, len))
        },
    )?;
    linker.func_wrap(WASI, "sched_yield", |_c: Caller<'_, HostState>| {
        errno::SUCCESS
    })?;
    linker.func_wrap(
        WASI,
        "proc_exit",
        |_c: Caller<'_, HostState>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::msg(format!(
                "the guest called WASI proc_exit({code})"
            )))
        },
    )?;
    Ok(())
}

fn environ_entries(state: &HostState) -> Vec<Vec<u8>> {
    state
        .env
        .iter()
        .map(|(k, v)| {
            let mut e = format!("{k}={v}").into_bytes();
            e.push(0);
            e
        })
        .collect()
}

fn environ_sizes_get(
    c: &mut Caller<'_, HostState>,
    count_ptr: i32,
    size_ptr: i32,
) -> HostResult<i32> {
    let entries = environ_entries(c.data());
    let size: usize = entries.iter().map(Vec::len).sum();
    memory::write_u32(c, count_ptr, entries.len() as u32)?;
    memory::write_u32(c, size_ptr, size as u32)?;
    Ok(errno::SUCCESS)
}

fn environ_get(c: &mut Caller<'_, HostState>, environ_ptr: i32, buf_ptr: i32) -> HostResult<i32> {
    let entries = environ_entries(c.data());
    let mut array = environ_ptr as u32;
    let mut buf = buf_ptr as u32;
    for entry in entries {
        memory::write_u32(c, array as i32, buf)?;
        memory::write(c, buf as i32, &entry)?;
        array = array.wrapping_add(4);
        buf = buf.wrapping_add(entry.len() as u32);
    }
    Ok(errno::SUCCESS)
}

fn fd_write(
    c: &mut Caller<'_, HostState>,
    fd: i32,
    iovs: i32,
    iovs_len: i32,
    nwritten_ptr: i32,
) -> HostResult<i32> {
    let level = match fd {
        1 => LogLevel::Info,
        2 => LogLevel::Error,
        _ => return Ok(errno::BADF),
    };
    let mut data = Vec::new();
    for i in 0..(iovs_len as u32) {
        let iov = (iovs as u32).wrapping_add(i.wrapping_mul(8)) as i32;
        let buf = memory::read_u32(c, iov)?;
        let len = memory::read_u32(c, iov.wrapping_add(4))?;
        data.extend(memory::read(c, buf as i32, len as i32)?);
    }
    memory::write_u32(c, nwritten_ptr, data.len() as u32)?;
    let state = c.data_mut();
    if fd == 1 {
        state.stdout.extend_from_slice(&data);
    } else {
        state.stderr.extend_from_slice(&data);
    }
    let text = String::from_utf8_lossy(&data);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    if !text.is_empty() {
        state.log(level, text.to_string());
    }
    Ok(errno::SUCCESS)
}

fn random_get(c: &mut Caller<'_, HostState>, buf_ptr: i32, len: i32) -> HostResult<i32> {
    let len = memory::addr(len);
    if len > 64 * 1024 {
        return Ok(errno::INVAL);
    }
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        bytes.extend_from_slice(&c.data_mut().next_random().to_le_bytes());
    }
    bytes.truncate(len);
    memory::write(c, buf_ptr, &bytes)?;
    Ok(errno::SUCCESS)
}
