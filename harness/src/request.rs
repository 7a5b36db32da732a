//! [`HttpRequest`] (what a client and upstream send) and [`HttpExchange`] (what
//! the filter made of it), for [`crate::Plugin::http_request`].

use crate::abi::{Action, StreamType};
use crate::property;
use crate::records::LocalResponse;
use crate::state::StreamState;

/// A request plus the upstream's answer, built for [`crate::Plugin::http_request`].
///
/// Exists so a typical test is one expression: build the request, run it, assert
/// on the [`HttpExchange`].
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct HttpRequest {
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    pub(crate) trailers: Vec<(String, String)>,
    pub(crate) properties: Vec<(Vec<String>, Vec<u8>)>,
    pub(crate) response_headers: Vec<(String, String)>,
    pub(crate) response_body: Vec<u8>,
    pub(crate) response_trailers: Vec<(String, String)>,
    pub(crate) root_context: Option<u32>,
}

impl HttpRequest {
    /// A GET: `:method GET`, `:path`, `:authority localhost`, `:scheme http`.
    pub fn get(path: &str) -> Self {
        Self::method("GET", path)
    }

    /// A POST to `path` (add a body with [`HttpRequest::body`]).
    pub fn post(path: &str) -> Self {
        Self::method("POST", path)
    }

    /// A request with any method and the default `:authority` and `:scheme`.
    pub fn method(method: &str, path: &str) -> Self {
        Self::new()
            .header(":method", method)
            .header(":path", path)
            .header(":authority", "localhost")
            .header(":scheme", "http")
    }

    /// A request with no headers at all.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a request header (name lower-cased, as Envoy does).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// The request body (sent in one chunk).
    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = b.into();
        self
    }

    /// Appends a request trailer.
    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.trailers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// A stream-level property (overrides VM-level ones and the stream defaults
    /// such as `source.address`).
    pub fn property(mut self, path: &[&str], value: impl Into<Vec<u8>>) -> Self {
        self.properties
            .push((property::owned_path(path), value.into()));
        self
    }

    /// A downstream mTLS peer: `connection.mtls = true` and
    /// `connection.uri_san_peer_certificate = uri_san` (e.g. a SPIFFE id).
    pub fn mtls_peer(self, uri_san: &str) -> Self {
        self.property(&["connection", "mtls"], property::bool(true))
            .property(&["connection", "uri_san_peer_certificate"], uri_san)
    }

    /// Appends a header of the upstream's response (default: just `:status 200`).
    pub fn response_header(mut self, name: &str, value: &str) -> Self {
        self.response_headers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// The upstream's response body.
    pub fn response_body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.response_body = b.into();
        self
    }

    /// Appends a trailer of the upstream's response.
    pub fn response_trailer(mut self, name: &str, value: &str) -> Self {
        self.response_trailers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// Runs the stream on another root context of the VM (see
    /// `Plugin::add_root_context`); default: the first root.
    pub fn root_context(mut self, root_context_id: u32) -> Self {
        self.root_context = Some(root_context_id);
        self
    }
}

/// What happened to an [`HttpRequest`] in the filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpExchange {
    /// The HTTP context id the stream had.
    pub context_id: u32,
    /// Request headers as the filter left them (what the upstream app would see).
    pub request_headers: Vec<(String, String)>,
    /// What `proxy_on_request_headers` returned (Pause if it sent a local response).
    pub request_action: Action,
    /// Request body the filter let through.
    pub request_body: Vec<u8>,
    /// Response headers as the filter left them (what the client would see); for
    /// a local response, `:status` plus its headers.
    pub response_headers: Vec<(String, String)>,
    /// What `proxy_on_response_headers` returned; None when the exchange stopped
    /// in the request phase (local response, reset, or a pause never resumed).
    pub response_action: Option<Action>,
    /// Response body the client got (the local response's body if there was one).
    pub response_body: Vec<u8>,
    /// The local response the filter sent, if any.
    pub local_response: Option<LocalResponse>,
    /// Whether the filter called `resume_http_request`/`resume_http_response`.
    pub resumed: bool,
    /// Whether the filter reset the stream.
    pub reset: bool,
    /// Properties the guest set on the stream, in order.
    pub properties_set: Vec<(Vec<String>, Vec<u8>)>,
}

fn first<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    let name = name.to_ascii_lowercase();
    headers
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.as_str())
}

impl HttpExchange {
    pub(crate) fn from_state(
        context_id: u32,
        s: StreamState,
        request_action: Action,
        response_action: Option<Action>,
    ) -> Self {
        let (response_headers, response_body) = match &s.local_response {
            Some(local) => {
                let mut headers = vec![(":status".to_string(), local.status.to_string())];
                headers.extend(local.headers.iter().cloned());
                (headers, local.body.clone())
            }
            None => (
                s.response_headers
                    .as_ref()
                    .map(|m| m.to_strings())
                    .unwrap_or_default(),
                s.response_body_sent.clone(),
            ),
        };
        HttpExchange {
            context_id,
            request_headers: s
                .request_headers
                .as_ref()
                .map(|m| m.to_strings())
                .unwrap_or_default(),
            request_action,
            request_body: s.request_body_sent.clone(),
            response_headers,
            response_action,
            response_body,
            resumed: s
                .continued
                .iter()
                .any(|t| matches!(t, StreamType::HttpRequest | StreamType::HttpResponse)),
            reset: !s.closed.is_empty(),
            local_response: s.local_response,
            properties_set: s.properties_set,
        }
    }

    /// First value of a request header after the filter ran.
    pub fn request_header(&self, name: &str) -> Option<&str> {
        first(&self.request_headers, name)
    }

    /// Every value of a request header after the filter ran.
    pub fn request_header_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.request_headers
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// First value of a response header as the client would see it.
    pub fn response_header(&self, name: &str) -> Option<&str> {
        first(&self.response_headers, name)
    }

    /// The value the guest last set for a stream property, if any.
    pub fn property_set(&self, path: &[&str]) -> Option<&[u8]> {
        self.properties_set
            .iter()
            .rev()
            .find(|(p, _)| p.iter().map(String::as_str).eq(path.iter().copied()))
            .map(|(_, v)| v.as_slice())
    }
}
