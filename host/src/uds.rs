//! The Unix sockets Envoy reaches the agent on (SDS, xDS).

use std::io;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::Path;

use tokio::net::UnixListener;

/// Binds `path` with mode 0600 (only Envoy, running as the agent's user,
/// may connect), creating its directory and removing a stale socket left by
/// an earlier run. A socket some live server answers on is left alone
/// (`AddrInUse`); so is any file that is not a socket. `what` names the
/// server in messages. Must be called inside a Tokio runtime.
pub fn bind_private(path: &Path, what: &str) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: another {what} server is listening", path.display()),
                ));
            }
            tracing::info!(path = %path.display(), "{what}: removing stale socket");
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
