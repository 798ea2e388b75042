//! An in-process OTLP/gRPC trace receiver: what the service exports, decoded, for tests to
//! assert on, and a slow mode that answers each export late (a collector under load).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// OTLP span kinds (`Span.kind`).
pub mod kind {
    /// SPAN_KIND_INTERNAL.
    pub const INTERNAL: i32 = 1;
    /// SPAN_KIND_SERVER.
    pub const SERVER: i32 = 2;
    /// SPAN_KIND_CLIENT.
    pub const CLIENT: i32 = 3;
    /// SPAN_KIND_PRODUCER.
    pub const PRODUCER: i32 = 4;
    /// SPAN_KIND_CONSUMER.
    pub const CONSUMER: i32 = 5;
}

/// One received span, ids in lowercase hex.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// Its name.
    pub name: String,
    /// Trace id (32 hex digits).
    pub trace_id: String,
    /// Span id (16 hex digits).
    pub span_id: String,
    /// The parent's span id, if any.
    pub parent_span_id: Option<String>,
    /// OTLP kind (see [`kind`]).
    pub kind: i32,
    /// Linked (trace id, span id) pairs.
    pub links: Vec<(String, String)>,
    /// String and integer attributes as text.
    pub attributes: Vec<(String, String)>,
    /// The resource's `service.name`.
    pub service_name: Option<String>,
    /// Start and end, in nanoseconds since the Unix epoch.
    pub start_unix_nano: u64,
    /// See `start_unix_nano`.
    pub end_unix_nano: u64,
}

impl ReceivedSpan {
    /// The text of attribute `key`.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Default)]
struct Received {
    spans: Mutex<Vec<ReceivedSpan>>,
    requests: Mutex<u64>,
}

#[derive(Debug)]
struct Receiver {
    received: Arc<Received>,
    delay: Duration,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(kv: &KeyValue) -> Option<(String, String)> {
    let value = match kv.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(s) => s.clone(),
        AnyValue::IntValue(i) => i.to_string(),
        AnyValue::BoolValue(b) => b.to_string(),
        AnyValue::DoubleValue(d) => d.to_string(),
        _ => return None,
    };
    Some((kv.key.clone(), value))
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        *self
            .received
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner()) += 1;
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let mut out = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service_name = rs.resource.as_ref().and_then(|r| {
                r.attributes
                    .iter()
                    .filter_map(text)
                    .find(|(k, _)| k == "service.name")
                    .map(|(_, v)| v)
            });
            for ss in rs.scope_spans {
                for span in ss.spans {
                    out.push(ReceivedSpan {
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: (!span.parent_span_id.is_empty())
                            .then(|| hex(&span.parent_span_id)),
                        kind: span.kind,
                        links: span
                            .links
                            .iter()
                            .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                            .collect(),
                        attributes: span.attributes.iter().filter_map(text).collect(),
                        service_name: service_name.clone(),
                        start_unix_nano: span.start_time_unix_nano,
                        end_unix_nano: span.end_time_unix_nano,
                    });
                }
            }
        }
        self.received
            .spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(out);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running receiver on 127.0.0.1; stops when dropped.
#[derive(Debug)]
pub struct Collector {
    addr: SocketAddr,
    received: Arc<Received>,
    task: JoinHandle<()>,
}

impl Collector {
    /// A receiver answering at once.
    pub async fn start() -> Self {
        Self::start_slow(Duration::ZERO).await
    }

    /// A receiver that answers each export after `delay`.
    pub async fn start_slow(delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP receiver");
        let addr = listener.local_addr().expect("receiver address");
        let received = Arc::new(Received::default());
        let service = TraceServiceServer::new(Receiver {
            received: received.clone(),
            delay,
        });
        let incoming = tokio_stream_from(listener);
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        Self {
            addr,
            received,
            task,
        }
    }

    /// The endpoint for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received
            .spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The spans of trace `trace_id`.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    /// Export requests received (answered or not).
    pub fn requests(&self) -> u64 {
        *self
            .received
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The listener as the connection stream tonic serves.
fn tokio_stream_from(
    listener: TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}
