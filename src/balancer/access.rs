//! The access log (`--access-log`): one line per request, written when the
//! response is done — after its last byte for streamed bodies, so `bytes`
//! and `duration_ms` cover the whole transfer and `complete=false` marks a
//! transfer that broke off (client gone, member failed mid-response).
//!
//! Lines are tracing events of target `clusterapp::access` at INFO, so they
//! follow `LOG_FORMAT=json` like every other line and can be filtered with
//! `RUST_LOG`. What is logged is what httpd's combined format has, minus
//! the Referer, plus the member and whether the request failed over. No
//! header values other than the User-Agent are logged: cookies and
//! credentials never reach the log.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures::Stream;
use http::header::USER_AGENT;
use http::{HeaderValue, Method, Request, Response, Uri, Version};

use super::body::{BodyError, ProxyBody};

/// Which member served a request; set by the proxy on the response.
#[derive(Debug, Clone)]
pub struct ServedBy {
    pub route: String,
    pub failover: bool,
}

/// One request's line, written when dropped.
#[derive(Debug)]
pub struct AccessEntry {
    started: Instant,
    remote: SocketAddr,
    tls: bool,
    method: Method,
    uri: Uri,
    version: Version,
    user_agent: Option<HeaderValue>,
    status: u16,
    served_by: Option<ServedBy>,
    bytes: u64,
    /// The response's Content-Length: hyper stops reading a body once that
    /// much has gone out, so reaching it is the end.
    expected: Option<u64>,
    complete: bool,
}

impl AccessEntry {
    /// Captures what the line needs from the request before the proxy consumes it.
    pub fn start<B>(remote: SocketAddr, tls: bool, req: &Request<B>) -> Self {
        AccessEntry {
            started: Instant::now(),
            remote,
            tls,
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            user_agent: req.headers().get(USER_AGENT).cloned(),
            status: 0,
            served_by: None,
            bytes: 0,
            expected: None,
            complete: false,
        }
    }

    /// Takes the response's facts; the line is written now for a body that
    /// is already complete, or when a streamed body ends or is dropped.
    pub fn attach(mut self, mut response: Response<ProxyBody>) -> Response<ProxyBody> {
        self.status = response.status().as_u16();
        self.served_by = response.extensions_mut().remove::<ServedBy>();
        let expected = response_length(response.headers());
        match response.body_mut() {
            ProxyBody::Empty | ProxyBody::Full(None) => self.complete = true,
            ProxyBody::Full(Some(bytes)) => {
                self.bytes = bytes.len() as u64;
                self.complete = true;
            }
            ProxyBody::Chunks(chunks) => {
                self.bytes = chunks.iter().map(|c| c.len() as u64).sum();
                self.complete = true;
            }
            ProxyBody::Stream(stream) => {
                self.expected = expected;
                let inner = std::mem::replace(stream, Box::pin(futures::stream::empty()));
                *stream = Box::pin(LoggedStream { inner, entry: self });
                return response;
            }
        }
        drop(self);
        response
    }
}

impl Drop for AccessEntry {
    fn drop(&mut self) {
        let path_and_query = self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let user_agent = self.user_agent.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("");
        let (route, failover) = match &self.served_by {
            Some(s) => (s.route.as_str(), s.failover),
            None => ("", false),
        };
        tracing::info!(
            target: "clusterapp::access",
            remote = %self.remote,
            tls = self.tls,
            method = self.method.as_str(),
            uri = path_and_query,
            protocol = ?self.version,
            status = self.status,
            bytes = self.bytes,
            duration_ms = (self.started.elapsed().as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
            member = route,
            failover,
            complete = self.complete,
            user_agent,
            "access"
        );
    }
}

fn response_length(headers: &http::HeaderMap) -> Option<u64> {
    headers.get(http::header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// A streamed response body that counts its bytes and logs when it ends.
struct LoggedStream {
    inner: Pin<Box<dyn Stream<Item = Result<Bytes, BodyError>> + Send>>,
    entry: AccessEntry,
}

impl Stream for LoggedStream {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let item = this.inner.as_mut().poll_next(cx);
        match &item {
            Poll::Ready(Some(Ok(bytes))) => {
                this.entry.bytes += bytes.len() as u64;
                this.entry.complete = this.entry.expected == Some(this.entry.bytes);
            }
            Poll::Ready(None) => this.entry.complete = true,
            _ => {}
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn entry() -> AccessEntry {
        let req = Request::get("/app/page?x=1")
            .header("user-agent", "t/1")
            .header("cookie", "JSESSIONID=secret")
            .body(())
            .unwrap();
        AccessEntry::start("127.0.0.1:5000".parse().unwrap(), false, &req)
    }

    #[tokio::test]
    async fn streamed_bodies_are_counted_to_their_end() {
        let stream = futures::stream::iter([Ok(Bytes::from_static(b"abc")), Ok(Bytes::from_static(b"de"))]);
        let mut logged = LoggedStream { inner: Box::pin(stream), entry: entry() };
        assert!(logged.next().await.is_some());
        assert_eq!((logged.entry.bytes, logged.entry.complete), (3, false), "mid-stream: not complete");
        while logged.next().await.is_some() {}
        assert_eq!((logged.entry.bytes, logged.entry.complete), (5, true));

        // With a Content-Length, hyper never asks past the last byte: reaching it is the end.
        let stream = futures::stream::iter([Ok(Bytes::from_static(b"abc")), Ok(Bytes::from_static(b"de"))]);
        let mut logged = LoggedStream { inner: Box::pin(stream), entry: entry() };
        logged.entry.expected = Some(5);
        logged.next().await;
        assert!(!logged.entry.complete);
        logged.next().await;
        assert!(logged.entry.complete, "complete at the announced length");
    }

    #[test]
    fn complete_bodies_are_logged_at_once_and_the_member_marker_is_consumed() {
        let mut response =
            Response::new(ProxyBody::Chunks([Bytes::from_static(b"abc"), Bytes::from_static(b"de")].into()));
        response.extensions_mut().insert(ServedBy { route: "s1".into(), failover: true });
        let response = entry().attach(response);
        assert!(response.extensions().get::<ServedBy>().is_none(), "the marker does not travel on to the client");
        assert!(matches!(response.body(), ProxyBody::Chunks(c) if c.len() == 2), "a complete body is left as it is");
    }
}
