//! An HTTP/1.1 echo app that plays a workload in tests and the demo.
//!
//! It answers every request with a JSON object describing what it received
//! (method, path, headers in arrival order) and keeps the same record in
//! memory, so a test can check exactly which headers reached the app after
//! Envoy and the filter. Keep-alive connections and request bodies
//! (`content-length`) are supported; chunked request bodies are refused.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

/// Largest request head accepted, like common proxies' defaults.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// One request as the app saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    /// Header names lower-cased, values as received, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl SeenRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (case-insensitive).
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The JSON the app answers with.
    pub fn to_json(&self, app_name: &str) -> serde_json::Value {
        let headers: Vec<serde_json::Value> = self
            .headers
            .iter()
            .map(|(n, v)| serde_json::json!([n, v]))
            .collect();
        serde_json::json!({
            "app": app_name,
            "method": self.method,
            "path": self.path,
            "headers": headers,
        })
    }
}

/// Why the echo app could not start.
#[derive(Debug, thiserror::Error)]
pub enum EchoError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// A running echo app; requests are served on background threads.
#[derive(Clone)]
pub struct EchoApp {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
}

impl EchoApp {
    /// Listens on `addr` (port 0 picks a free port) and serves until the process ends.
    pub fn spawn(addr: &str, app_name: &str) -> Result<EchoApp, EchoError> {
        let listener = TcpListener::bind(addr).map_err(|source| EchoError::Bind {
            addr: addr.to_string(),
            source,
        })?;
        let local = listener.local_addr().map_err(|source| EchoError::Bind {
            addr: addr.to_string(),
            source,
        })?;
        let app = EchoApp {
            addr: local,
            seen: Arc::default(),
        };
        let name = app_name.to_string();
        let seen = app.seen.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let seen = seen.clone();
                let name = name.clone();
                thread::spawn(move || {
                    if let Err(e) = serve_connection(conn, &name, &seen) {
                        tracing::debug!("echo connection ended: {e}");
                    }
                });
            }
        });
        Ok(app)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request seen so far.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// The most recent request, if any.
    pub fn last_request(&self) -> Option<SeenRequest> {
        self.seen.lock().ok().and_then(|v| v.last().cloned())
    }
}

enum ReadOutcome {
    Request(SeenRequest),
    Closed,
    Bad(&'static str),
}

fn read_request(reader: &mut BufReader<TcpStream>) -> std::io::Result<ReadOutcome> {
    let mut head_bytes = 0;
    let mut line = String::new();
    // Skip empty lines between requests (RFC 9112 §2.2).
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(ReadOutcome::Closed);
        }
        head_bytes += line.len();
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path), Some(_version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Ok(ReadOutcome::Bad("malformed request line"));
    };
    let (method, path) = (method.to_string(), path.to_string());
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(ReadOutcome::Closed);
        }
        head_bytes += line.len();
        if head_bytes > MAX_HEAD_BYTES {
            return Ok(ReadOutcome::Bad("request head too large"));
        }
        let trimmed = line.trim_end_matches(['\r', '\n']);
        if trimmed.is_empty() {
            break;
        }
        let Some((name, value)) = trimmed.split_once(':') else {
            return Ok(ReadOutcome::Bad("malformed header line"));
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut request = SeenRequest {
        method,
        path,
        headers,
        body: Vec::new(),
    };
    if request.header("transfer-encoding").is_some() {
        return Ok(ReadOutcome::Bad("chunked request bodies are not supported"));
    }
    if let Some(len) = request.header("content-length") {
        let Ok(len) = len.parse::<usize>() else {
            return Ok(ReadOutcome::Bad("invalid content-length"));
        };
        if len > MAX_BODY_BYTES {
            return Ok(ReadOutcome::Bad("request body too large"));
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        request.body = body;
    }
    Ok(ReadOutcome::Request(request))
}

fn respond(conn: &mut TcpStream, status: &str, body: &[u8], close: bool) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n",
        body.len(),
        if close { "connection: close\r\n" } else { "" }
    );
    // One write: head and body in separate segments would meet Nagle and
    // the peer's delayed ACK (a 40 ms stall per keep-alive response).
    let mut response = Vec::with_capacity(head.len() + body.len());
    response.extend_from_slice(head.as_bytes());
    response.extend_from_slice(body);
    conn.write_all(&response)?;
    conn.flush()
}

fn serve_connection(
    conn: TcpStream,
    app_name: &str,
    seen: &Mutex<Vec<SeenRequest>>,
) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    loop {
        match read_request(&mut reader)? {
            ReadOutcome::Closed => return Ok(()),
            ReadOutcome::Bad(why) => {
                let body = serde_json::json!({ "error": why }).to_string();
                return respond(&mut writer, "400 Bad Request", body.as_bytes(), true);
            }
            ReadOutcome::Request(request) => {
                let close = request
                    .header("connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                let mut body = request.to_json(app_name).to_string();
                body.push('\n');
                if let Ok(mut seen) = seen.lock() {
                    seen.push(request);
                }
                respond(&mut writer, "200 OK", body.as_bytes(), close)?;
                if close {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(addr: SocketAddr, raw: &str) -> String {
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.write_all(raw.as_bytes()).unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn echoes_headers_and_records_them() {
        let app = EchoApp::spawn("127.0.0.1:0", "product").unwrap();
        let out = exchange(
            app.addr(),
            "GET /a HTTP/1.1\r\nHost: x\r\nX-Test: 1\r\nx-test: 2\r\n\r\n\
             POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        );
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
        assert!(out.contains(r#""app":"product""#));
        let seen = app.requests();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].path, "/a");
        assert_eq!(seen[0].header_all("X-TEST"), ["1", "2"]);
        assert_eq!(seen[1].method, "POST");
        assert_eq!(seen[1].body, b"abc");
    }

    #[test]
    fn refuses_malformed_requests() {
        let app = EchoApp::spawn("127.0.0.1:0", "product").unwrap();
        let out = exchange(app.addr(), "GARBAGE\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        let out = exchange(app.addr(), "GET / HTTP/1.1\r\nno-colon\r\n\r\n");
        assert!(out.contains("malformed header line"), "{out}");
        assert!(app.requests().is_empty());
    }
}
