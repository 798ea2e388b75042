//! The Grafana dashboards of `deploy/grafana/dashboards`, read as data: the metric names their
//! Prometheus queries name, and the names a `/metrics` scrape exports. `tests/tests/dashboards.rs`
//! holds the two together against the running binaries; `.ci/checks.sh dashboards` checks that
//! the same queries parse.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `deploy/grafana/dashboards` of this checkout.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/dashboards")
}

/// One Prometheus query of a dashboard and where it is.
#[derive(Debug, Clone)]
pub struct Query {
    /// `<file>: panel <id> "<title>" <refId>` or `<file>: variable <name>`.
    pub place: String,
    pub expr: String,
}

/// Every Prometheus query of every dashboard in [`dir`] (panel targets, and the selectors of
/// `label_values(...)` variables), in file order.
pub fn queries() -> Vec<Query> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .expect("read deploy/grafana/dashboards")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read a dashboard");
        let board: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", f.display()));
        let name = f
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        out.extend(board_queries(&name, &board));
    }
    out
}

/// The Prometheus queries of one dashboard: targets whose datasource (or their panel's) is a
/// Prometheus datasource variable, `${datasource}`.
pub fn board_queries(name: &str, board: &Value) -> Vec<Query> {
    let vars = board["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let prom: BTreeSet<String> = vars
        .iter()
        .filter(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect();
    let is_prom = |ds: &Value| {
        let uid = ds["uid"].as_str().or(ds.as_str()).unwrap_or_default();
        let var = uid
            .trim_start_matches('$')
            .trim_start_matches('{')
            .trim_end_matches('}');
        uid.starts_with('$') && prom.contains(var)
    };
    let mut out = Vec::new();
    for v in &vars {
        if v["type"] != "query" || !is_prom(&v["datasource"]) {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or_default();
        if let Some(selector) = label_values_selector(q) {
            out.push(Query {
                place: format!("{name}: variable {}", v["name"]),
                expr: selector,
            });
        }
    }
    let mut panels: Vec<&Value> = Vec::new();
    collect_panels(&board["panels"], &mut panels);
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            let ds = if t["datasource"].is_null() {
                &p["datasource"]
            } else {
                &t["datasource"]
            };
            if let (true, Some(expr)) = (is_prom(ds), t["expr"].as_str()) {
                out.push(Query {
                    place: format!("{name}: panel {} {} {}", p["id"], p["title"], t["refId"]),
                    expr: expr.to_owned(),
                });
            }
        }
    }
    out
}

fn collect_panels<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    for p in v.as_array().into_iter().flatten() {
        out.push(p);
        collect_panels(&p["panels"], out);
    }
}

/// `label_values(<selector>, <label>)` → the selector; `label_values(<label>)` names no metric.
fn label_values_selector(q: &str) -> Option<String> {
    let inner = q.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    let (selector, _label) = inner.rsplit_once(',')?;
    Some(selector.trim().to_owned())
}

/// PromQL words that are not metric names (aggregations, keywords, literals).
const NOT_METRICS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "start",
    "end",
    "inf",
    "nan",
];
/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names a PromQL expression selects: identifiers that are not functions, keywords,
/// label names (inside `{...}` or after `by`/`on`/...), strings, durations or numbers.
/// Grafana variables (`$pod`, `${pod}`, `$__rate_interval`) are skipped too.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let c: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let ident = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';
    while i < c.len() {
        let ch = c[i];
        if ch == '"' || ch == '\'' || ch == '`' {
            i = skip_string(&c, i);
        } else if ch == '{' {
            i = skip_group(&c, i, '{', '}');
        } else if ch == '[' {
            i = skip_group(&c, i, '[', ']');
        } else if ch == '#' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '$' {
            i += 1;
            if c.get(i) == Some(&'{') {
                i = skip_group(&c, i, '{', '}');
            }
            while i < c.len() && ident(c[i]) {
                i += 1;
            }
        } else if ch.is_ascii_digit()
            || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < c.len() && (ident(c[i]) || c[i] == '.') {
                i += 1;
            }
        } else if ident(ch) {
            let start = i;
            while i < c.len() && ident(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let mut j = i;
            while j < c.len() && c[j].is_whitespace() {
                j += 1;
            }
            let call = c.get(j) == Some(&'(');
            if LABEL_LISTS.contains(&word.as_str()) {
                if call {
                    i = skip_group(&c, j, '(', ')');
                }
            } else if !call && !NOT_METRICS.contains(&word.to_ascii_lowercase().as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The index after the string literal that starts at `i`.
fn skip_string(c: &[char], i: usize) -> usize {
    let quote = c[i];
    let mut j = i + 1;
    while j < c.len() && c[j] != quote {
        j += if c[j] == '\\' && quote != '`' { 2 } else { 1 };
    }
    j + 1
}

/// The index after the group that opens at `i` (nested groups and strings inside skipped).
fn skip_group(c: &[char], i: usize, open: char, close: char) -> usize {
    let mut depth = 0;
    let mut j = i;
    while j < c.len() {
        match c[j] {
            '"' | '\'' | '`' => {
                j = skip_string(c, j);
                continue;
            }
            x if x == open => depth += 1,
            x if x == close => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    j
}

/// Every metric name the dashboards' queries name, each with the places that name it.
pub fn wanted() -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for q in queries() {
        for name in metric_names(&q.expr) {
            out.entry(name).or_default().push(q.place.clone());
        }
    }
    out
}

/// The sample names of a Prometheus text exposition (`x_bucket`, `x_sum`, `x_count` for a
/// histogram `x`, as PromQL selects them).
pub fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// `GET /metrics` from `addr` (HTTP/1.0, so the body is never chunked); the body.
pub async fn scrape(addr: SocketAddr) -> Result<String, String> {
    let go = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8(buf).map_err(|e| format!("not UTF-8: {e}"))?;
        let (head, body) = text.split_once("\r\n\r\n").ok_or("no end of headers")?;
        let status = head.split(' ').nth(1);
        if !head.starts_with("HTTP/1.") || status != Some("200") {
            return Err(format!(
                "answered {}",
                head.lines().next().unwrap_or_default()
            ));
        }
        Ok(body.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(3), go)
        .await
        .unwrap_or_else(|_| Err("no answer within 3s".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(expr: &str) -> Vec<String> {
        metric_names(expr).into_iter().collect()
    }

    #[test]
    fn metric_names_skip_functions_keywords_labels_and_variables() {
        assert_eq!(
            names(
                r#"histogram_quantile(0.95, sum by (grpc_method, le) (rate(grpc_server_handling_seconds_bucket{job=~"$job", grpc_method=~"a{b}"}[$__rate_interval])))"#
            ),
            ["grpc_server_handling_seconds_bucket"]
        );
        assert_eq!(
            names(
                "sum by (x) (rate(a_total{c!=\"OK\"}[5m] offset 1h)) / on (job) group_left (pod) max without (le) (b) > bool 0.8 * 1e3"
            ),
            ["a_total", "b"]
        );
        assert_eq!(
            names(
                "quantile by (step) (0.95, last_over_time(q:rec{step=~\"${step}\"}[1h])) or vector(0)"
            ),
            ["q:rec"]
        );
        assert_eq!(names("up and on() (x)"), ["up", "x"]);
        assert!(names("vector(1)").is_empty());
    }

    #[test]
    fn label_values_variables_name_their_selector() {
        assert_eq!(
            label_values_selector(r#"label_values(quiesce_build_info{job="quiesce"}, pod)"#)
                .as_deref(),
            Some(r#"quiesce_build_info{job="quiesce"}"#)
        );
        assert_eq!(label_values_selector("label_values(pod)"), None);
    }

    #[test]
    fn exported_names_are_sample_names() {
        let text =
            "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\nup 1\n";
        let got: Vec<String> = exported(text).into_iter().collect();
        assert_eq!(got, ["h_bucket", "h_count", "h_sum", "up"]);
    }

    #[test]
    fn the_dashboards_have_prometheus_queries_only_behind_the_datasource_variable() {
        let q = queries();
        assert!(q.len() > 20, "too few queries found: {q:?}");
        let w = wanted();
        for name in [
            "grpc_server_handled_total",
            "quiesce_step_budget_seconds",
            "outbox_unsent_events_total",
        ] {
            assert!(
                w.contains_key(name),
                "{name} not found in the dashboards: {w:?}"
            );
        }
        // The Loki and Tempo targets are not PromQL.
        assert!(
            !w.contains_key("service_name") && !w.contains_key("trace_id"),
            "{w:?}"
        );
    }
}
