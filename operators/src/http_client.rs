//! A small HTTP/1.1 client (hyper, rustls with the system's roots) for webhooks and for the CLI's
//! admin commands. Every request has a timeout; bodies are bounded.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Largest response body read.
const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// An HTTP client; cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body (at most 4 MiB).
    pub body: Bytes,
}

impl HttpClient {
    /// Builds a client for `http://` and `https://` URLs.
    ///
    /// # Errors
    /// When the system's root certificates cannot be loaded.
    pub fn new() -> Result<Self, String> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| format!("TLS roots: {e}"))?
            .https_or_http()
            .enable_http1()
            .build();
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(8)
            .build(https);
        Ok(Self { inner })
    }

    /// Sends one request and reads the response, all within `timeout`.
    ///
    /// # Errors
    /// A description when the URL is invalid, the connection fails or the timeout passes.
    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, String)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<Response, String> {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let fut = async {
            let res = self.inner.request(req).await.map_err(|e| {
                // The source chain says why (refused, DNS, TLS).
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                msg
            })?;
            let status = res.status().as_u16();
            let body = Limited::new(res.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading the response: {e}"))?
                .to_bytes();
            Ok(Response { status, body })
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| format!("no response within {timeout:?}"))?
    }
}
