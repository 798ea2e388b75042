//! The `/metrics` HTTP endpoint (Prometheus text format). It is not one of the nine steps: it
//! keeps answering through the whole shutdown so the stop can be watched, and ends with the
//! process.
//!
//! - `GET /metrics` — every metric in [`Metrics`]
//! - anything else — 404

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// A running `/metrics` endpoint; dropping it stops it.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl MetricsServer {
    /// Serves `metrics` on `listener` until the returned handle is dropped.
    pub fn start(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    () = token.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(conn) => conn,
                        Err(e) => {
                            tracing::debug!(error = %e, "metrics accept failed");
                            continue;
                        }
                    },
                };
                let metrics = metrics.clone();
                let token = token.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let metrics = metrics.clone();
                        async move { Ok::<_, std::convert::Infallible>(respond(&req, &metrics)) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        () = token.cancelled() => {}
                        result = conn => if let Err(e) = result {
                            tracing::debug!(error = %e, "metrics connection failed");
                        },
                    }
                });
            }
        });
        Ok(Self { addr, stop })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn respond(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let mut response = if req.method() == Method::GET && req.uri().path() == "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from(metrics.render())));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        r
    } else {
        Response::new(Full::new(Bytes::from_static(
            b"not found: the only endpoint is GET /metrics\n",
        )))
    };
    if req.uri().path() != "/metrics" || req.method() != Method::GET {
        *response.status_mut() = StatusCode::NOT_FOUND;
    }
    response
}
