//! OTLP/gRPC on the wire: the few protobuf messages of `opentelemetry/proto/collector/trace/v1`
//! a shutdown trace needs, and one unary `TraceService/Export` call over HTTP/2.
//!
//! Written out here instead of pulling in an OpenTelemetry SDK: a supervisor exports a dozen
//! spans once per pod lifetime. It adds hyper's HTTP/2 client half and prost's encoder to the
//! HTTP/2 server and protobuf code the probe server links anyway (248 KiB of binary,
//! docs/BENCHMARKS.md). Field numbers are the OTLP v1 ones
//! (`trace.proto`, `common.proto`, `resource.proto`); the tests decode what this encodes with
//! the official generated types.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use prost::Message;
use tokio::net::TcpStream;

/// `ExportTraceServiceRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct ExportRequest {
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<ResourceSpans>,
}

/// `ResourceSpans`.
#[derive(Clone, PartialEq, Message)]
pub struct ResourceSpans {
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<ScopeSpans>,
}

/// `Resource`.
#[derive(Clone, PartialEq, Message)]
pub struct Resource {
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
}

/// `ScopeSpans`.
#[derive(Clone, PartialEq, Message)]
pub struct ScopeSpans {
    #[prost(message, optional, tag = "1")]
    pub scope: Option<Scope>,
    #[prost(message, repeated, tag = "2")]
    pub spans: Vec<Span>,
}

/// `InstrumentationScope`.
#[derive(Clone, PartialEq, Message)]
pub struct Scope {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub version: String,
}

/// `Span`.
#[derive(Clone, PartialEq, Message)]
pub struct Span {
    #[prost(bytes = "vec", tag = "1")]
    pub trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub span_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub parent_span_id: Vec<u8>,
    #[prost(string, tag = "5")]
    pub name: String,
    /// `SpanKind`; 1 is `SPAN_KIND_INTERNAL`.
    #[prost(int32, tag = "6")]
    pub kind: i32,
    #[prost(fixed64, tag = "7")]
    pub start_time_unix_nano: u64,
    #[prost(fixed64, tag = "8")]
    pub end_time_unix_nano: u64,
    #[prost(message, repeated, tag = "9")]
    pub attributes: Vec<KeyValue>,
    #[prost(message, optional, tag = "15")]
    pub status: Option<Status>,
}

/// `SPAN_KIND_INTERNAL`.
pub const KIND_INTERNAL: i32 = 1;
/// `STATUS_CODE_ERROR`.
pub const STATUS_ERROR: i32 = 2;

/// `Status`.
#[derive(Clone, PartialEq, Message)]
pub struct Status {
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(int32, tag = "3")]
    pub code: i32,
}

/// `KeyValue`.
#[derive(Clone, PartialEq, Message)]
pub struct KeyValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyValue>,
}

impl KeyValue {
    /// A string attribute.
    pub fn text(key: &str, value: impl Into<String>) -> KeyValue {
        KeyValue::of(key, Value::String(value.into()))
    }

    /// An integer attribute.
    pub fn int(key: &str, value: i64) -> KeyValue {
        KeyValue::of(key, Value::Int(value))
    }

    /// An integer attribute from a count or a duration in milliseconds (at most `i64::MAX`).
    pub fn count(key: &str, value: u64) -> KeyValue {
        KeyValue::int(key, i64::try_from(value).unwrap_or(i64::MAX))
    }

    fn of(key: &str, value: Value) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue { value: Some(value) }),
        }
    }
}

/// `AnyValue`.
#[derive(Clone, PartialEq, Message)]
pub struct AnyValue {
    #[prost(oneof = "Value", tags = "1, 3")]
    pub value: Option<Value>,
}

/// `AnyValue.value`: the two kinds a shutdown trace uses.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    #[prost(string, tag = "1")]
    String(String),
    #[prost(int64, tag = "3")]
    Int(i64),
}

/// Where spans go: an OTLP/gRPC collector reachable over plain HTTP/2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port`, as dialled and as the `:authority`.
    pub authority: String,
}

/// The most of a collector's answer that is read (an `ExportTraceServiceResponse` is a few bytes).
const MAX_ANSWER: usize = 64 * 1024;

/// The gRPC method a collector serves traces on.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Sends one export request; returns when the collector answered, or why it did not. The caller
/// bounds the time.
pub async fn export(settings: &super::Settings, request: &ExportRequest) -> Result<(), String> {
    let endpoint = &settings.endpoint;
    let tcp = TcpStream::connect(&endpoint.authority)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", endpoint.authority))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .map_err(|e| format!("HTTP/2 handshake with {} failed: {e}", endpoint.authority))?;
    let driver = tokio::spawn(connection);
    let result = call(&mut sender, settings, request).await;
    driver.abort();
    result
}

async fn call(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    settings: &super::Settings,
    request: &ExportRequest,
) -> Result<(), String> {
    let endpoint = &settings.endpoint;
    let message = request.encode_to_vec();
    // gRPC framing: no compression, a 4-byte big-endian length, the message.
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0);
    body.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    body.extend_from_slice(&message);
    let mut req = hyper::Request::post(format!("http://{}{EXPORT_PATH}", endpoint.authority));
    for (name, value) in &settings.headers {
        req = req.header(name.as_str(), value.as_str());
    }
    let req = req
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("user-agent", concat!("quiesce/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("cannot build the export request: {e}"))?;
    let response = sender
        .send_request(req)
        .await
        .map_err(|e| format!("export to {} failed: {e}", endpoint.authority))?;
    if !response.status().is_success() {
        return Err(format!(
            "the collector at {} answered HTTP {}",
            endpoint.authority,
            response.status()
        ));
    }
    // A trailers-only answer carries grpc-status in the headers; otherwise it comes last.
    let mut status = grpc_status(response.headers());
    // A collector's answer is a few bytes; one that sends more is not read into PID 1's memory.
    let collected = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("reading the collector's answer failed: {e}"))?;
    if let Some(trailers) = collected.trailers() {
        status = status.or_else(|| grpc_status(trailers));
    }
    match status {
        Some((0, _)) => Ok(()),
        Some((code, message)) => Err(format!(
            "the collector at {} refused the spans: grpc-status {code} {message}",
            endpoint.authority
        )),
        None => Err(format!(
            "the collector at {} answered without a grpc-status",
            endpoint.authority
        )),
    }
}

fn grpc_status(headers: &hyper::HeaderMap) -> Option<(u32, String)> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Some((code, message))
}

/// The export timeout when `OTEL_EXPORTER_OTLP_TIMEOUT` says nothing shorter: a shutdown trace is
/// sent while the pod terminates, so it never holds the exit up for long.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
