//! Whether and where the shutdown trace goes, from the standard OpenTelemetry variables.
//!
//! A value quiesce cannot use turns traces off with a line that names the variable and the fix;
//! it never stops the pod from starting: tracing is observability, not the workload.

use std::time::Duration;

use super::otlp::{
    self, Endpoint, ExportRequest, KeyValue, Resource, ResourceSpans, Scope, ScopeSpans, Span,
};

/// Traces on: where to, and what describes this process.
#[derive(Clone, Debug)]
pub struct Settings {
    pub endpoint: Endpoint,
    /// The variable the endpoint came from, for `check-config`.
    pub endpoint_from: &'static str,
    pub timeout: Duration,
    /// Extra request headers (`OTEL_EXPORTER_OTLP_HEADERS`: a collector's credentials).
    pub headers: Vec<(String, String)>,
    /// The resource's attributes (`service.name=quiesce` first).
    pub resource: Vec<KeyValue>,
}

/// The signal-specific variable (`OTEL_EXPORTER_OTLP_TRACES_<KEY>`) if set, else the generic one
/// (`OTEL_EXPORTER_OTLP_<KEY>`), as the OpenTelemetry specification orders them.
fn otlp_var(
    get: &dyn Fn(&str) -> Option<String>,
    traces: &'static str,
    generic: &'static str,
) -> Option<(&'static str, String)> {
    get(traces)
        .map(|v| (traces, v))
        .or_else(|| get(generic).map(|v| (generic, v)))
}

impl Settings {
    /// From the process environment, where the config's `env` (what the app gets on top of it) wins.
    pub fn from_env(
        overrides: &std::collections::BTreeMap<String, String>,
    ) -> Result<Option<Settings>, String> {
        Settings::from_vars(&|name| {
            overrides
                .get(name)
                .cloned()
                .or_else(|| std::env::var(name).ok())
        })
    }

    /// From `var`: `Ok(None)` when traces are off (no endpoint, or turned off), `Err` naming the
    /// variable and the fix when a value cannot be used. Enumerated values are case-insensitive.
    pub fn from_vars(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<Settings>, String> {
        let get = |name: &str| {
            var(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        if let Some(exporter) = get("OTEL_TRACES_EXPORTER")
            && !exporter
                .split(',')
                .any(|e| e.trim().eq_ignore_ascii_case("otlp"))
        {
            return Ok(None);
        }
        let Some((from, value)) = otlp_var(
            &get,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ) else {
            return Ok(None);
        };
        if let Some((name, p)) = otlp_var(
            &get,
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ) && !p.eq_ignore_ascii_case("grpc")
        {
            return Err(format!(
                "{name}={p}: quiesce exports its shutdown trace over OTLP/gRPC only; set it to `grpc` and point {from} at the collector's gRPC port (usually 4317)"
            ));
        }
        let insecure = otlp_var(
            &get,
            "OTEL_EXPORTER_OTLP_TRACES_INSECURE",
            "OTEL_EXPORTER_OTLP_INSECURE",
        )
        .is_some_and(|(_, v)| v.eq_ignore_ascii_case("true"));
        let endpoint =
            parse_endpoint(&value, insecure).map_err(|why| format!("{from}={value}: {why}"))?;
        let headers = match otlp_var(
            &get,
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "OTEL_EXPORTER_OTLP_HEADERS",
        ) {
            Some((name, v)) => parse_headers(&v).map_err(|why| format!("{name}: {why}"))?,
            None => Vec::new(),
        };
        Ok(Some(Settings {
            endpoint,
            endpoint_from: from,
            timeout: timeout(&get)?,
            headers,
            resource: resource(get("OTEL_RESOURCE_ATTRIBUTES").as_deref()),
        }))
    }

    /// One export request holding `spans`.
    pub fn request(&self, spans: Vec<Span>) -> ExportRequest {
        ExportRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: self.resource.clone(),
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(Scope {
                        name: "quiesce".to_owned(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                    }),
                    spans,
                }],
            }],
        }
    }
}

/// `http://host:port[/path]` or `host:port`; the port defaults to 4317. `https` is refused: the
/// supervisor links no TLS.
fn parse_endpoint(value: &str, insecure: bool) -> Result<Endpoint, String> {
    let rest = if let Some(rest) = value.strip_prefix("http://") {
        rest
    } else if value.starts_with("https://") {
        return Err(
            "quiesce links no TLS, so it cannot export over https; use a collector on the node or in the pod over `http://…:4317`"
                .to_owned(),
        );
    } else if value.contains("://") {
        return Err("expected `http://host:port`".to_owned());
    } else if insecure {
        value
    } else {
        return Err(
            "without a scheme an OTLP/gRPC endpoint means TLS, which quiesce does not link; write `http://` in front (or set OTEL_EXPORTER_OTLP_INSECURE=true)"
                .to_owned(),
        );
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') {
        return Err("expected `http://host:port`".to_owned());
    }
    let port = |port: &str| match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(true),
        _ => Err(format!("`{port}` is not a port number (1-65535)")),
    };

    let has_port = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once(']') {
            Some((_, "")) => false,
            Some((_, rest)) => match rest.strip_prefix(':') {
                Some(p) => port(p)?,
                None => return Err("expected `http://[v6 address]:port`".to_owned()),
            },
            None => return Err("an IPv6 address ends with `]`".to_owned()),
        }
    } else {
        match authority.split_once(':') {
            None => false,
            Some((_, p)) if p.contains(':') => {
                return Err("an IPv6 address goes in brackets: `http://[::1]:4317`".to_owned());
            }
            Some(("", _)) => {
                return Err("the host is missing: expected `http://host:port`".to_owned());
            }
            Some((_, p)) => port(p)?,
        }
    };
    let authority = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:4317")
    };
    Ok(Endpoint { authority })
}

/// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` / `OTEL_EXPORTER_OTLP_TIMEOUT` in milliseconds, capped by
/// [`otlp::DEFAULT_TIMEOUT`].
fn timeout(get: &dyn Fn(&str) -> Option<String>) -> Result<Duration, String> {
    let Some((name, v)) = otlp_var(
        get,
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ) else {
        return Ok(otlp::DEFAULT_TIMEOUT);
    };
    let ms: u64 = v
        .parse()
        .map_err(|_| format!("{name}={v}: expected whole milliseconds, e.g. `{name}=1000`"))?;
    // 0 would fail every export; it is taken as "the default".
    Ok(match ms {
        0 => otlp::DEFAULT_TIMEOUT,
        ms => Duration::from_millis(ms).min(otlp::DEFAULT_TIMEOUT),
    })
}

/// `service.name=quiesce`, the version and pid, then `OTEL_RESOURCE_ATTRIBUTES` (`k=v,k2=v2`,
/// percent-encoded values) without its `service.name`, which names the app.
fn resource(attributes: Option<&str>) -> Vec<KeyValue> {
    let mut out = vec![
        KeyValue::text("service.name", "quiesce"),
        KeyValue::text("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::int("process.pid", i64::from(std::process::id())),
    ];
    // A malformed pair is passed over: the attributes describe, they decide nothing.
    for (key, value) in key_values(attributes.unwrap_or_default()).flatten() {
        if key.is_empty() || key == "service.name" || out.iter().any(|kv| kv.key == key) {
            continue;
        }
        out.push(KeyValue::text(key, value));
    }
    out
}

/// The OpenTelemetry list format of `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_EXPORTER_OTLP_HEADERS`:
/// `key=value` pairs, comma-separated, values percent-encoded; empty entries are skipped, an entry
/// without `=` is an `Err` holding it.
fn key_values(text: &str) -> impl Iterator<Item = Result<(&str, String), &str>> {
    text.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) => Ok((key.trim(), percent_decode(value.trim()))),
            None => Err(pair),
        })
}

/// `OTEL_EXPORTER_OTLP_HEADERS`: `name=value` pairs, comma-separated, values percent-encoded.
fn parse_headers(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for pair in key_values(text) {
        let (name, value) = pair.map_err(|bad| format!("`{bad}` is not `name=value`"))?;
        let name = name.to_ascii_lowercase();
        if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err()
            || hyper::header::HeaderValue::from_str(&value).is_err()
        {
            return Err(format!("`{name}` is not a valid header name and value"));
        }
        out.push((name, value));
    }
    Ok(out)
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<Option<Settings>, String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_vars(&|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    fn authority(vars: &[(&str, &str)]) -> String {
        from(vars).unwrap().unwrap().endpoint.authority
    }

    #[test]
    fn off_without_an_endpoint_or_when_turned_off() {
        assert!(from(&[]).unwrap().is_none());
        assert!(
            from(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])
                .unwrap()
                .is_none()
        );
        let on = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        assert!(
            from(&[on, ("OTEL_SDK_DISABLED", "true")])
                .unwrap()
                .is_none()
        );
        assert!(
            from(&[on, ("OTEL_TRACES_EXPORTER", "none")])
                .unwrap()
                .is_none()
        );
        assert!(
            from(&[on, ("OTEL_TRACES_EXPORTER", "otlp")])
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn endpoints() {
        let e = |v: &str| authority(&[("OTEL_EXPORTER_OTLP_ENDPOINT", v)]);
        assert_eq!(e("http://collector:4317"), "collector:4317");
        assert_eq!(e("http://collector"), "collector:4317");
        assert_eq!(e("http://127.0.0.1:9999/"), "127.0.0.1:9999");
        assert_eq!(
            authority(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
                ("OTEL_EXPORTER_OTLP_INSECURE", "TRUE"),
            ]),
            "collector:4317",
            "scheme-less only when insecure is said"
        );
        assert_eq!(e("http://[::1]:4317"), "[::1]:4317");
        assert_eq!(e("http://[::1]"), "[::1]:4317");
        assert_eq!(
            authority(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:1"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:2"),
            ]),
            "b:2"
        );
    }

    #[test]
    fn unusable_values_name_the_variable_and_the_fix() {
        let err = |vars: &[(&str, &str)]| from(vars).unwrap_err();
        let e = err(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317")]);
        assert!(
            e.starts_with("OTEL_EXPORTER_OTLP_ENDPOINT=https://collector:4317: ")
                && e.contains("no TLS"),
            "{e}"
        );
        let e = err(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:http")]);
        assert!(e.contains("`http` is not a port number (1-65535)"), "{e}");
        let e = err(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://::1:4317")]);
        assert!(e.contains("brackets"), "{e}");
        let e = err(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")]);
        assert!(
            e.contains("without a scheme") && e.contains("http://"),
            "{e}"
        );
        let e = err(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://:4317")]);
        assert!(e.contains("the host is missing"), "{e}");
        let e = err(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:0")]);
        assert!(e.contains("`0` is not a port number"), "{e}");
        let e = err(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "authorization"),
        ]);
        assert!(
            e.starts_with("OTEL_EXPORTER_OTLP_HEADERS: `authorization` is not `name=value`"),
            "{e}"
        );
        let e = err(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ]);
        assert!(
            e.starts_with("OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf") && e.contains("grpc"),
            "{e}"
        );
        let e = err(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "5s"),
        ]);
        assert!(e.contains("expected whole milliseconds"), "{e}");
    }

    #[test]
    fn values_are_case_insensitive_timeouts_of_0_are_the_default_and_headers_are_sent() {
        let on = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317");
        assert!(
            from(&[on, ("OTEL_TRACES_EXPORTER", "OTLP")])
                .unwrap()
                .is_some()
        );
        assert!(
            from(&[on, ("OTEL_EXPORTER_OTLP_PROTOCOL", "GRPC")])
                .unwrap()
                .is_some()
        );
        let s = from(&[
            on,
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "0"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "Authorization=Bearer%20abc, x-tenant=t1",
            ),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(s.timeout, otlp::DEFAULT_TIMEOUT);
        assert_eq!(
            s.headers,
            [
                ("authorization".to_string(), "Bearer abc".to_string()),
                ("x-tenant".to_string(), "t1".to_string())
            ]
        );
        assert_eq!(percent_decode("a%+fb%2C"), "a%+fb,");
    }

    #[test]
    fn the_configs_env_wins_over_the_process_environment() {
        let overrides: std::collections::BTreeMap<String, String> = [(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT".to_string(),
            "http://from-config:4317".to_string(),
        )]
        .into();
        let s = Settings::from_env(&overrides).unwrap().unwrap();
        assert_eq!(s.endpoint.authority, "from-config:4317");
    }

    #[test]
    fn the_resource_is_quiesce_with_the_pods_attributes() {
        let s = from(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=order-service,k8s.pod.name=web-1,note=a%2Cb",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "250"),
        ])
        .unwrap()
        .unwrap();
        let text = |key: &str| {
            s.resource
                .iter()
                .find(|kv| kv.key == key)
                .and_then(|kv| match &kv.value {
                    Some(otlp::AnyValue {
                        value: Some(otlp::Value::String(v)),
                    }) => Some(v.clone()),
                    _ => None,
                })
        };
        assert_eq!(text("service.name").as_deref(), Some("quiesce"));
        assert_eq!(text("k8s.pod.name").as_deref(), Some("web-1"));
        assert_eq!(text("note").as_deref(), Some("a,b"));
        assert_eq!(s.timeout, Duration::from_millis(250));
    }
}
