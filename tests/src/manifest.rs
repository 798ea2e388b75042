//! What the simulator takes from `deploy/k8s`: the probes, periods and thresholds of the
//! Deployment, its `terminationGracePeriodSeconds` and preStop command, and the supervisor's
//! `prestop_delay` and step budgets from `quiesce.toml` — read from the files themselves, so the
//! simulation drifts with the manifests instead of a copy of them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use yaml_rust2::{Yaml, YamlLoader};

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// `deploy/k8s/quiesce.toml`, the supervisor configuration the pod runs with.
pub fn quiesce_toml() -> PathBuf {
    repo_root().join("deploy/k8s/quiesce.toml")
}

/// One kubelet gRPC probe, with Kubernetes' defaults for the fields the manifest leaves out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub service: String,
    pub port: u16,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// The container's lifecycle as kubelet runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodManifest {
    pub startup: Probe,
    pub readiness: Probe,
    pub liveness: Probe,
    pub termination_grace: Duration,
    /// `lifecycle.preStop.exec.command`.
    pub prestop_command: Vec<String>,
}

/// The supervisor settings the assertions need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorPlan {
    pub grace_period: Duration,
    pub safety_margin: Duration,
    pub prestop_delay: Duration,
    /// `[steps]` budgets by config key (`stop_consumer`, …).
    pub budgets: Vec<(String, Duration)>,
}

impl SupervisorPlan {
    /// The budget of `[steps].key`.
    pub fn budget(&self, key: &str) -> Option<Duration> {
        self.budgets.iter().find(|(k, _)| k == key).map(|(_, d)| *d)
    }
}

/// Errors name the file and the field.
#[derive(Debug)]
pub struct ManifestError(pub String);

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ManifestError {}

fn secs(v: &Yaml, default: u64, what: &str) -> Result<Duration, ManifestError> {
    match v {
        Yaml::BadValue => Ok(Duration::from_secs(default)),
        Yaml::Integer(n) if *n >= 0 => Ok(Duration::from_secs(*n as u64)),
        other => Err(ManifestError(format!(
            "{what}: expected a non-negative integer of seconds, found {other:?}"
        ))),
    }
}

fn count(v: &Yaml, default: u32, what: &str) -> Result<u32, ManifestError> {
    match v {
        Yaml::BadValue => Ok(default),
        Yaml::Integer(n) if *n >= 1 => Ok(*n as u32),
        other => Err(ManifestError(format!(
            "{what}: expected a positive integer, found {other:?}"
        ))),
    }
}

fn probe(container: &Yaml, key: &str) -> Result<Probe, ManifestError> {
    let p = &container[key];
    if p.is_badvalue() {
        return Err(ManifestError(format!(
            "deployment.yaml: the container has no {key}"
        )));
    }
    let grpc = &p["grpc"];
    let port = grpc["port"].as_i64().ok_or_else(|| {
        ManifestError(format!(
            "deployment.yaml: {key}.grpc.port missing (the simulator only speaks gRPC probes)"
        ))
    })?;
    let what = |f: &str| format!("deployment.yaml: {key}.{f}");
    // Kubernetes defaults: initialDelaySeconds 0, periodSeconds 10, timeoutSeconds 1,
    // successThreshold 1, failureThreshold 3.
    Ok(Probe {
        service: grpc["service"].as_str().unwrap_or("").to_owned(),
        port: u16::try_from(port)
            .map_err(|_| ManifestError(format!("{}: {port} is not a port", what("grpc.port"))))?,
        initial_delay: secs(&p["initialDelaySeconds"], 0, &what("initialDelaySeconds"))?,
        period: secs(&p["periodSeconds"], 10, &what("periodSeconds"))?,
        timeout: secs(&p["timeoutSeconds"], 1, &what("timeoutSeconds"))?,
        success_threshold: count(&p["successThreshold"], 1, &what("successThreshold"))?,
        failure_threshold: count(&p["failureThreshold"], 3, &what("failureThreshold"))?,
    })
}

impl PodManifest {
    /// Reads `deploy/k8s/deployment.yaml`.
    pub fn load() -> Result<Self, ManifestError> {
        let path = repo_root().join("deploy/k8s/deployment.yaml");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ManifestError(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text)
    }

    /// Parses a Deployment (first container).
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let docs = YamlLoader::load_from_str(text)
            .map_err(|e| ManifestError(format!("deployment.yaml is not YAML: {e}")))?;
        let doc = docs
            .first()
            .ok_or_else(|| ManifestError("deployment.yaml is empty".into()))?;
        let spec = &doc["spec"]["template"]["spec"];
        let container = &spec["containers"][0];
        if container.is_badvalue() {
            return Err(ManifestError(
                "deployment.yaml: spec.template.spec.containers[0] missing".into(),
            ));
        }
        let prestop_command = container["lifecycle"]["preStop"]["exec"]["command"]
            .as_vec()
            .map(|v| {
                v.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            startup: probe(container, "startupProbe")?,
            readiness: probe(container, "readinessProbe")?,
            liveness: probe(container, "livenessProbe")?,
            // Kubernetes' default grace is 30 s.
            termination_grace: secs(
                &spec["terminationGracePeriodSeconds"],
                30,
                "deployment.yaml: terminationGracePeriodSeconds",
            )?,
            prestop_command,
        })
    }
}

fn dur(table: &toml::Table, key: &str, default: &str) -> Result<Duration, ManifestError> {
    let text = match table.get(key) {
        None => default,
        Some(toml::Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(ManifestError(format!(
                "quiesce.toml: {key} = {other} is not a duration string"
            )));
        }
    };
    humantime::parse_duration(text)
        .map_err(|e| ManifestError(format!("quiesce.toml: {key} = {text:?}: {e}")))
}

impl SupervisorPlan {
    /// Reads `deploy/k8s/quiesce.toml` (defaults as the README documents them).
    pub fn load() -> Result<Self, ManifestError> {
        let path = quiesce_toml();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ManifestError(format!("cannot read {}: {e}", path.display())))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e| ManifestError(format!("{} is not TOML: {e}", path.display())))?;
        let empty = toml::Table::new();
        let steps = table
            .get("steps")
            .and_then(toml::Value::as_table)
            .unwrap_or(&empty);
        let mut budgets = Vec::new();
        for (key, default) in [
            ("stop_accepting", "1s"),
            ("drain_in_flight", "7s"),
            ("stop_cron", "3s"),
            ("stop_consumer", "5s"),
            ("stop_poller", "3s"),
            ("close_mq", "1s"),
            ("close_redis", "1s"),
            ("close_db", "2s"),
        ] {
            budgets.push((key.to_owned(), dur(steps, key, default)?));
        }
        Ok(Self {
            grace_period: dur(&table, "grace_period", "30s")?,
            safety_margin: dur(&table, "safety_margin", "2s")?,
            prestop_delay: dur(&table, "prestop_delay", "0s")?,
            budgets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_deployment_probes() {
        let m = PodManifest::load().expect("deploy/k8s/deployment.yaml");
        for p in [&m.startup, &m.readiness, &m.liveness] {
            assert_eq!(p.port, 50051, "{p:?}");
            assert!(p.period >= Duration::from_secs(1), "{p:?}");
        }
        assert_eq!(m.startup.service, "startup");
        assert_eq!(m.readiness.service, "readiness");
        assert_eq!(m.liveness.service, "liveness");
        assert_eq!(
            m.prestop_command.last().map(String::as_str),
            Some("prestop")
        );
        let plan = SupervisorPlan::load().expect("deploy/k8s/quiesce.toml");
        assert_eq!(
            plan.grace_period, m.termination_grace,
            "quiesce.toml grace_period must equal terminationGracePeriodSeconds"
        );
        let total: Duration = plan.budgets.iter().map(|(_, d)| *d).sum();
        assert!(plan.prestop_delay + total + plan.safety_margin <= plan.grace_period);
    }

    #[test]
    fn applies_kubernetes_defaults_and_names_bad_fields() {
        let text = "spec:\n  template:\n    spec:\n      containers:\n        - name: x\n          startupProbe: {grpc: {port: 1}}\n          readinessProbe: {grpc: {port: 2, service: readiness}, periodSeconds: 5}\n          livenessProbe: {grpc: {port: 3}, failureThreshold: 0}\n";
        let err = PodManifest::parse(text).expect_err("failureThreshold 0");
        assert!(err.0.contains("livenessProbe.failureThreshold"), "{err}");
        let ok = text.replace("failureThreshold: 0", "failureThreshold: 4");
        let m = PodManifest::parse(&ok).expect("valid");
        assert_eq!(m.termination_grace, Duration::from_secs(30));
        assert_eq!(m.startup.period, Duration::from_secs(10));
        assert_eq!(m.startup.timeout, Duration::from_secs(1));
        assert_eq!(m.readiness.period, Duration::from_secs(5));
        assert_eq!(m.liveness.failure_threshold, 4);
    }
}
