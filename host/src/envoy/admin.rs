//! The few calls the agent makes to Envoy's admin API (loopback HTTP/1.1):
//! draining listeners before a stop, and asking whether Envoy is live.
//! A tiny client on a fresh connection per call: the admin API is local,
//! the calls are rare, and a pooled client would outlive Envoy restarts.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The most of an admin answer the agent reads.
const MAX_RESPONSE: u64 = 1 << 20;

/// An admin call that failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The connection failed (Envoy not up, or gone).
    #[error("Envoy admin {addr}: {error}")]
    Io {
        addr: SocketAddr,
        #[source]
        error: io::Error,
    },
    /// Envoy did not answer in time (stuck, or overloaded).
    #[error("Envoy admin {addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    /// Envoy refused the call.
    #[error("Envoy admin {addr}: {path} answered {status}: {body}")]
    Status {
        addr: SocketAddr,
        path: String,
        status: u16,
        body: String,
    },
    /// Something else answered on the admin address.
    #[error("Envoy admin {addr}: not an HTTP answer")]
    Malformed { addr: SocketAddr },
}

/// One request; returns the status and body.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), AdminError> {
    let io = |error| AdminError::Io { addr, error };
    let call = async {
        let mut conn = TcpStream::connect(addr).await.map_err(io)?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await.map_err(io)?;
        let mut raw = Vec::new();
        conn.take(MAX_RESPONSE)
            .read_to_end(&mut raw)
            .await
            .map_err(io)?;
        Ok::<_, AdminError>(raw)
    };
    let raw = tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| AdminError::Timeout { addr, timeout })??;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or(AdminError::Malformed { addr })?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_string();
    Ok((status, body))
}

/// `POST /drain_listeners?graceful`: listeners keep accepting but tell
/// clients to go away (`Connection: close`, GOAWAY) for Envoy's drain time,
/// so in-flight requests finish while new ones move elsewhere.
pub async fn drain_listeners(addr: SocketAddr, timeout: Duration) -> Result<(), AdminError> {
    let path = "/drain_listeners?graceful";
    match request(addr, "POST", path, timeout).await? {
        (200, _) => Ok(()),
        (status, body) => Err(AdminError::Status {
            addr,
            path: path.into(),
            status,
            body: body.trim().to_string(),
        }),
    }
}

/// `GET /ready`: `true` when Envoy reports `LIVE`.
pub async fn is_live(addr: SocketAddr, timeout: Duration) -> bool {
    matches!(request(addr, "GET", "/ready", timeout).await, Ok((200, _)))
}
