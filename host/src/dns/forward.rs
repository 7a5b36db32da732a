//! Forwarding what the mesh does not answer to the upstream nameservers
//! (Istio §5.5 step 6): over the client's protocol, with a timeout, one
//! server after the other (or all at once), relaying the first answer
//! unchanged except for the ID.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};

use super::random_u64;

/// Which transport the client used; the upstream query uses the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Udp,
    Tcp,
}

/// The upstream servers and how to ask them.
#[derive(Debug, Clone)]
pub struct Forwarder {
    pub servers: Vec<SocketAddr>,
    /// Per server (and for all of them at once when parallel).
    pub timeout: Duration,
    /// Ask every server at once, first answer wins (Istio:
    /// `DNS_FORWARD_PARALLEL`).
    pub parallel: bool,
}

/// An upstream nameserver: `IP` (port 53), `IP:port` or `[IPv6]:port`.
pub fn parse_server(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    text.parse::<SocketAddr>()
        .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("`{text}` is not a nameserver address (IP, IP:port or [IPv6]:port)"))
}

/// Why an upstream gave no answer.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl Forwarder {
    /// Sends `query` (a whole DNS message, at least a header) upstream and
    /// returns the first reply with the client's ID, or `None` when every
    /// server failed (the caller answers SERVFAIL).
    pub async fn forward(&self, query: &[u8], protocol: Protocol) -> Option<Vec<u8>> {
        if self.servers.is_empty() || query.len() < 12 {
            return None;
        }
        let mut servers = self.servers.clone();
        super::shuffle(&mut servers);
        let client_id = [query[0], query[1]];
        let mut reply = if self.parallel {
            let attempts = servers.iter().map(|server| {
                Box::pin(self.exchange(*server, query, protocol))
                    as std::pin::Pin<Box<dyn Future<Output = Option<Vec<u8>>> + Send + '_>>
            });
            first_some(attempts.collect()).await?
        } else {
            let mut found = None;
            for server in servers {
                if let Some(reply) = self.exchange(server, query, protocol).await {
                    found = Some(reply);
                    break;
                }
            }
            found?
        };
        reply[..2].copy_from_slice(&client_id);
        Some(reply)
    }

    async fn exchange(
        &self,
        server: SocketAddr,
        query: &[u8],
        protocol: Protocol,
    ) -> Option<Vec<u8>> {
        let id = (random_u64() as u16).to_be_bytes();
        let mut query = query.to_vec();
        query[..2].copy_from_slice(&id);
        let result = tokio::time::timeout(self.timeout, async {
            match protocol {
                Protocol::Udp => exchange_udp(server, &query, id).await,
                Protocol::Tcp => exchange_tcp(server, &query, id).await,
            }
        })
        .await
        .unwrap_or(Err(ForwardError::Timeout(self.timeout)));
        match result {
            Ok(reply) => Some(reply),
            Err(error) => {
                tracing::debug!(%server, ?protocol, %error, "DNS: upstream failed");
                None
            }
        }
    }
}

async fn exchange_udp(
    server: SocketAddr,
    query: &[u8],
    id: [u8; 2],
) -> Result<Vec<u8>, ForwardError> {
    let local: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("address")
    } else {
        "[::]:0".parse().expect("address")
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = socket.recv(&mut buf).await?;
        // A stray datagram with another ID is not our answer.
        if n >= 12 && buf[..2] == id && buf[2] & 0x80 != 0 {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn exchange_tcp(
    server: SocketAddr,
    query: &[u8],
    id: [u8; 2],
) -> Result<Vec<u8>, ForwardError> {
    let mut stream = TcpStream::connect(server).await?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&(query.len() as u16).to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    loop {
        let len = stream.read_u16().await? as usize;
        let mut buf = vec![0u8; len];
        stream.read_exact(&mut buf).await?;
        if len >= 12 && buf[..2] == id {
            return Ok(buf);
        }
    }
}

/// The first `Some` of several futures, or `None` once all are `None`.
async fn first_some<'a, T>(
    mut futures: Vec<std::pin::Pin<Box<dyn Future<Output = Option<T>> + Send + 'a>>>,
) -> Option<T> {
    std::future::poll_fn(|cx| {
        let mut i = 0;
        while i < futures.len() {
            match futures[i].as_mut().poll(cx) {
                std::task::Poll::Ready(Some(value)) => return std::task::Poll::Ready(Some(value)),
                std::task::Poll::Ready(None) => {
                    drop(futures.swap_remove(i));
                }
                std::task::Poll::Pending => i += 1,
            }
        }
        if futures.is_empty() {
            std::task::Poll::Ready(None)
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses() {
        for (text, addr) in [
            ("10.0.0.2", "10.0.0.2:53"),
            ("10.0.0.2:5353", "10.0.0.2:5353"),
            ("fd00::2", "[fd00::2]:53"),
            ("[fd00::2]:5353", "[fd00::2]:5353"),
        ] {
            assert_eq!(parse_server(text), Ok(addr.parse().unwrap()), "{text}");
        }
        for bad in ["dns.example", "10.0.0.2:", "fd00::2:5353x", ""] {
            assert!(parse_server(bad).is_err(), "{bad}");
        }
    }
}
