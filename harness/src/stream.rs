//! [`HttpStream`]: one HTTP context driven step by step.

use crate::abi::{Action, StreamType};
use crate::error::HarnessError;
use crate::header_map::HeaderMap;
use crate::plugin::{Part, Plugin};
use crate::property;
use crate::records::LocalResponse;
use crate::state::StreamState;

/// An HTTP context created by [`Plugin::http_stream`], for flows a single
/// [`Plugin::http_request`] cannot express: pausing for an HTTP call, chunked
/// bodies, trailers, inspecting headers between callbacks.
///
/// Each method runs one Envoy callback. The stream borrows the Plugin; use
/// [`HttpStream::plugin`] to answer HTTP calls or tick meanwhile. Dropping the
/// stream without [`HttpStream::finish`] still runs `proxy_on_log`,
/// `proxy_on_done` and `proxy_on_delete` (errors ignored).
pub struct HttpStream<'p> {
    plugin: &'p mut Plugin,
    context_id: u32,
    finished: bool,
}

impl std::fmt::Debug for HttpStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpStream")
            .field("context_id", &self.context_id)
            .finish_non_exhaustive()
    }
}

impl Drop for HttpStream<'_> {
    fn drop(&mut self) {
        if !self.finished && !self.plugin.failed() {
            let _ = self.plugin.finish_stream(self.context_id);
        }
    }
}

fn to_strings(map: Option<&HeaderMap>) -> Vec<(String, String)> {
    map.map(HeaderMap::to_strings).unwrap_or_default()
}

impl<'p> HttpStream<'p> {
    pub(crate) fn new(plugin: &'p mut Plugin, context_id: u32) -> Self {
        Self {
            plugin,
            context_id,
            finished: false,
        }
    }

    pub(crate) fn state(&self) -> Option<&StreamState> {
        self.plugin.stream(self.context_id)
    }

    pub(crate) fn deliver(
        &mut self,
        part: Part,
        map: HeaderMap,
        end_of_stream: bool,
    ) -> Result<Action, HarnessError> {
        self.plugin
            .deliver_map(self.context_id, part, map, end_of_stream)
    }

    pub(crate) fn deliver_body(
        &mut self,
        part: Part,
        body: &[u8],
        end_of_stream: bool,
    ) -> Result<Action, HarnessError> {
        self.plugin
            .deliver_body(self.context_id, part, body, end_of_stream)
    }

    /// The context id Envoy would use for this stream.
    pub fn context_id(&self) -> u32 {
        self.context_id
    }

    /// The Plugin, to answer HTTP calls, tick or read logs while the stream lives.
    pub fn plugin(&mut self) -> &mut Plugin {
        self.plugin
    }

    /// Runs `proxy_on_request_headers` with these headers (names lower-cased).
    pub fn request_headers(
        &mut self,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Result<Action, HarnessError> {
        self.deliver(
            Part::RequestHeaders,
            HeaderMap::from_pairs(headers),
            end_of_stream,
        )
    }

    /// Runs `proxy_on_request_body` with this chunk.
    pub fn request_body(
        &mut self,
        body: &[u8],
        end_of_stream: bool,
    ) -> Result<Action, HarnessError> {
        self.deliver_body(Part::RequestBody, body, end_of_stream)
    }

    /// Runs `proxy_on_request_trailers`.
    pub fn request_trailers(&mut self, trailers: &[(&str, &str)]) -> Result<Action, HarnessError> {
        self.deliver(Part::RequestTrailers, HeaderMap::from_pairs(trailers), true)
    }

    /// Runs `proxy_on_response_headers` with these (upstream) headers.
    pub fn response_headers(
        &mut self,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Result<Action, HarnessError> {
        self.deliver(
            Part::ResponseHeaders,
            HeaderMap::from_pairs(headers),
            end_of_stream,
        )
    }

    /// Runs `proxy_on_response_body` with this chunk.
    pub fn response_body(
        &mut self,
        body: &[u8],
        end_of_stream: bool,
    ) -> Result<Action, HarnessError> {
        self.deliver_body(Part::ResponseBody, body, end_of_stream)
    }

    /// Runs `proxy_on_response_trailers`.
    pub fn response_trailers(&mut self, trailers: &[(&str, &str)]) -> Result<Action, HarnessError> {
        self.deliver(
            Part::ResponseTrailers,
            HeaderMap::from_pairs(trailers),
            true,
        )
    }

    /// Sets a stream-level property (e.g. `connection.mtls`).
    pub fn set_property(&mut self, path: &[&str], value: impl Into<Vec<u8>>) {
        if let Ok(s) = self.plugin.stream_mut(self.context_id) {
            s.properties.set(property::owned_path(path), value.into());
        }
    }

    /// A property as this stream's guest context would see it.
    pub fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.plugin
            .store
            .data()
            .property_in(self.context_id, &property::owned_path(path))
    }

    /// The request headers as the filter left them so far.
    pub fn request_headers_now(&self) -> Vec<(String, String)> {
        to_strings(self.state().and_then(|s| s.request_headers.as_ref()))
    }

    /// The response headers as the filter left them so far.
    pub fn response_headers_now(&self) -> Vec<(String, String)> {
        to_strings(self.state().and_then(|s| s.response_headers.as_ref()))
    }

    /// The request trailers as the filter left them so far.
    pub fn request_trailers_now(&self) -> Vec<(String, String)> {
        to_strings(self.state().and_then(|s| s.request_trailers.as_ref()))
    }

    /// The response trailers as the filter left them so far.
    pub fn response_trailers_now(&self) -> Vec<(String, String)> {
        to_strings(self.state().and_then(|s| s.response_trailers.as_ref()))
    }

    /// Request body let through so far, followed by what the filter still buffers.
    pub fn request_body_now(&self) -> Vec<u8> {
        self.state()
            .map(|s| [s.request_body_sent.as_slice(), s.request_body.as_slice()].concat())
            .unwrap_or_default()
    }

    /// Response body let through so far, followed by what the filter still buffers.
    pub fn response_body_now(&self) -> Vec<u8> {
        self.state()
            .map(|s| [s.response_body_sent.as_slice(), s.response_body.as_slice()].concat())
            .unwrap_or_default()
    }

    /// The local response the filter sent, if any.
    pub fn local_response(&self) -> Option<LocalResponse> {
        self.state().and_then(|s| s.local_response.clone())
    }

    /// Whether the filter resumed the request (`resume_http_request`).
    pub fn request_resumed(&self) -> bool {
        self.state()
            .is_some_and(|s| s.continued.contains(&StreamType::HttpRequest))
    }

    /// Whether the filter resumed either direction.
    pub fn resumed(&self) -> bool {
        self.state().is_some_and(|s| !s.continued.is_empty())
    }

    /// Whether the filter reset (closed) the stream.
    pub fn reset(&self) -> bool {
        self.state().is_some_and(|s| !s.closed.is_empty())
    }

    /// Properties the guest set on this stream, in order.
    pub fn properties_set(&self) -> Vec<(Vec<String>, Vec<u8>)> {
        self.state()
            .map(|s| s.properties_set.clone())
            .unwrap_or_default()
    }

    /// Ends the stream like Envoy: `proxy_on_log`, `proxy_on_done`, `proxy_on_delete`.
    pub fn finish(self) -> Result<(), HarnessError> {
        self.finish_state().map(|_| ())
    }

    pub(crate) fn finish_state(mut self) -> Result<StreamState, HarnessError> {
        self.finished = true;
        self.plugin.finish_stream(self.context_id)
    }
}
