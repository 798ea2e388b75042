#!/usr/bin/env python3
"""Policy checks that schema validation cannot see: the supervisor config and the manifests agree.

Renders the kustomization (kubectl kustomize), finds the Deployment whose entrypoint is quiesce,
reads the supervisor config from the ConfigMap it mounts, and fails when they drift apart:

- terminationGracePeriodSeconds != grace_period, or the time budget (prestop_delay + step budgets
  + safety_margin) does not fit inside the grace period;
- a probe that is not native gRPC on the supervisor's health port with the right service name
  (startup/liveness/readiness), or a liveness timeout the supervisor cannot answer within;
- preStop not exec'ing `quiesce prestop` directly (no shell in a distroless image);
- a socket directory that is not a writable emptyDir under readOnlyRootFilesystem;
- termination message settings, resources (no CPU limit, CPU request for the HPA), non-root;
- a PDB, Service or HPA that does not select/target the Deployment's pods;
- with --compose: stop_grace_period != the grace period of the config the service runs with;
- with --dockerfile: the image's ENTRYPOINT/CMD/USER differ from the Deployment's command/args/uid.

Usage: k8s_policy.py KUSTOMIZE_DIR [--compose COMPOSE_FILE] [--dockerfile DOCKERFILE]
Exit 0 when every check passes, 1 with one line per problem (what is wrong and how to fix it).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

# Step budgets the supervisor uses when [steps] leaves a key out (config-design.md).
DEFAULT_STEPS = {
    "stop_accepting": 1.0,
    "drain_in_flight": 7.0,
    "stop_cron": 3.0,
    "stop_consumer": 5.0,
    "stop_poller": 3.0,
    "close_mq": 1.0,
    "close_redis": 1.0,
    "close_db": 2.0,
}
DEFAULTS = {
    "grace_period": 30.0,
    "safety_margin": 2.0,
    "prestop_delay": 0.0,
    "termination_log": "/dev/termination-log",
    "admin_socket": "/run/quiesce/admin.sock",
    "health_address": "0.0.0.0:50051",
    "metrics_address": "0.0.0.0:9090",
    "liveness_timeout": 1.0,
}
PROBE_SERVICES = {
    "startupProbe": "startup",
    "livenessProbe": "liveness",
    "readinessProbe": "readiness",
}

PROBE_WHY = {
    "startupProbe": "`startup` turns SERVING once the app has said hello on the control socket",
    "livenessProbe": "`liveness` ignores dependencies; `readiness` or \"\" would restart every pod "
    "during a database outage and at every shutdown",
    "readinessProbe": "`readiness` follows the required dependencies and goes NOT_SERVING at "
    "shutdown step 1; `liveness` or `startup` would keep traffic on a draining pod",
}

_UNITS = {
    "ns": 1e-9, "nsec": 1e-9,
    "us": 1e-6, "usec": 1e-6,
    "ms": 1e-3, "msec": 1e-3,
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
}
_PART = re.compile(r"\s*(\d+)\s*([a-z]+)")


def parse_duration(text: str, key: str) -> float:
    """Seconds in a humantime duration such as "5s", "250ms" or "1m 30s"."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{key}: expected a duration string like \"5s\", got {text!r}")
    pos, total = 0, 0.0
    s = text.strip()
    while pos < len(s):
        m = _PART.match(s, pos)
        if not m or m.group(2) not in _UNITS:
            raise ValueError(f"{key}: cannot parse duration {text!r} (use e.g. \"5s\", \"250ms\")")
        total += int(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return total


def fmt(seconds: float) -> str:
    return f"{seconds:g}s"


class Report:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.passed = 0

    def check(self, ok: bool, problem: str) -> None:
        if ok:
            self.passed += 1
        else:
            self.problems.append(problem)


def render(kustomize_dir: str) -> list[dict]:
    out = subprocess.run(
        ["kubectl", "kustomize", kustomize_dir], check=True, capture_output=True, text=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find_quiesce_deployment(docs: list[dict]) -> tuple[dict, dict]:
    for d in docs:
        if d.get("kind") != "Deployment":
            continue
        for c in d["spec"]["template"]["spec"].get("containers", []):
            if (c.get("command") or [""])[0].endswith("/quiesce"):
                return d, c
    raise SystemExit("k8s-policy: no Deployment with a container whose command is quiesce")


def config_path_from_args(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--":
            break
    raise SystemExit("k8s-policy: quiesce is started without --config FILE; pass the mounted config")


def load_mounted_config(docs: list[dict], pod: dict, container: dict, path: str) -> dict:
    """The TOML text the container sees at `path`, from the ConfigMap volume mounted over it."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/")
        if not path.startswith(mount + "/"):
            continue
        key = m.get("subPath") or path[len(mount) + 1:]
        cm_name = volumes.get(m["name"], {}).get("configMap", {}).get("name")
        for d in docs:
            if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == cm_name:
                if key not in d.get("data", {}):
                    raise SystemExit(f"k8s-policy: ConfigMap {cm_name} has no key {key!r} for {path}")
                return tomllib.loads(d["data"][key])
    raise SystemExit(f"k8s-policy: nothing mounts a ConfigMap at {path} (the --config path)")


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def check_deployment(r: Report, docs: list[dict]) -> float:
    dep, c = find_quiesce_deployment(docs)
    pod = dep["spec"]["template"]["spec"]
    argv = list(c.get("command", [])) + list(c.get("args", []))
    cfg = load_mounted_config(docs, pod, c, config_path_from_args(argv))
    name = f"Deployment/{dep['metadata']['name']}"

    # --- grace period and time budget -------------------------------------------------------
    grace = parse_duration(cfg.get("grace_period", "30s"), "grace_period")
    margin = parse_duration(cfg.get("safety_margin", "2s"), "safety_margin")
    prestop = parse_duration(cfg.get("prestop_delay", "0s"), "prestop_delay")
    steps = dict(DEFAULT_STEPS)
    for k, v in cfg.get("steps", {}).items():
        steps[k] = parse_duration(v, f"steps.{k}")
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    r.check(
        grace == tgps,
        f"{name}: terminationGracePeriodSeconds is {tgps} but quiesce.toml grace_period is "
        f"{fmt(grace)}; set both to the same value (the supervisor plans its deadline from "
        f"grace_period, kubelet SIGKILLs at terminationGracePeriodSeconds)",
    )
    r.check(
        0 < margin < grace,
        f"quiesce.toml: safety_margin {fmt(margin)} must be > 0 and < grace_period {fmt(grace)}",
    )
    needed = prestop + sum(steps.values()) + margin
    r.check(
        needed <= grace + 1e-9,
        f"quiesce.toml: prestop_delay {fmt(prestop)} + step budgets {fmt(sum(steps.values()))} + "
        f"safety_margin {fmt(margin)} = {fmt(needed)} exceeds grace_period {fmt(grace)}; the last "
        f"steps (close_db) would be cut short. Shrink a budget or raise grace_period and "
        f"terminationGracePeriodSeconds together",
    )

    # --- preStop ------------------------------------------------------------------------------
    quiesce_bin = c["command"][0]
    pre = (c.get("lifecycle", {}).get("preStop") or {})
    r.check(
        pre.get("exec", {}).get("command") == [quiesce_bin, "prestop"],
        f"{name}: lifecycle.preStop must be exec.command [\"{quiesce_bin}\", \"prestop\"] (no shell: "
        f"the image has none, and only quiesce knows when the endpoint removal delay is over); "
        f"found {pre!r}",
    )
    r.check(
        prestop > 0,
        "quiesce.toml: prestop_delay is 0s under Kubernetes; set it (5s) so endpoints are removed "
        "before the app stops accepting",
    )

    # --- probes -------------------------------------------------------------------------------
    health = cfg.get("health", {})
    r.check(health.get("enabled", True) is True, "quiesce.toml: [health] enabled must be true: the probes need it")
    health_port = port_of(health.get("address", DEFAULTS["health_address"]))
    for probe, service in PROBE_SERVICES.items():
        p = c.get(probe)
        if p is None:
            r.check(False, f"{name}: {probe} is missing; add a grpc probe on port {health_port} with service: {service}")
            continue
        grpc = p.get("grpc")
        r.check(
            grpc is not None and set(p) & {"httpGet", "tcpSocket", "exec"} == set(),
            f"{name}: {probe} must be a native grpc probe (grpc.health.v1 served by quiesce), found {sorted(p)}",
        )
        if grpc is None:
            continue
        r.check(
            grpc.get("port") == health_port,
            f"{name}: {probe}.grpc.port is {grpc.get('port')} but quiesce serves health on "
            f"{health_port} ([health] address); make them equal",
        )
        r.check(
            grpc.get("service") == service,
            f"{name}: {probe}.grpc.service is {grpc.get('service')!r}; it must be {service!r}: "
            f"{PROBE_WHY[probe]}",
        )
    live = c.get("livenessProbe") or {}
    live_cfg = parse_duration(health.get("liveness_timeout", "1s"), "health.liveness_timeout")
    r.check(
        live.get("timeoutSeconds", 1) > live_cfg,
        f"{name}: livenessProbe.timeoutSeconds ({live.get('timeoutSeconds', 1)}) must exceed "
        f"[health] liveness_timeout ({fmt(live_cfg)}), or a slow-but-alive app fails its probe",
    )

    # --- ports --------------------------------------------------------------------------------
    ports = {p["containerPort"]: p.get("name", "") for p in c.get("ports", [])}
    r.check(health_port in ports, f"{name}: declare containerPort {health_port} (health) in ports")
    metrics = cfg.get("metrics", {})
    if metrics.get("enabled", True):
        mport = port_of(metrics.get("address", DEFAULTS["metrics_address"]))
        r.check(
            ports.get(mport, "").endswith("metrics"),
            f"{name}: declare containerPort {mport} with a name ending in 'metrics' so the scrape job finds it",
        )

    # --- termination message ------------------------------------------------------------------
    tlog = cfg.get("termination_log", DEFAULTS["termination_log"])
    r.check(
        c.get("terminationMessagePath", "/dev/termination-log") == tlog,
        f"{name}: terminationMessagePath {c.get('terminationMessagePath', '/dev/termination-log')!r} "
        f"!= quiesce.toml termination_log {tlog!r}; kubelet would not show the shutdown summary",
    )
    r.check(
        c.get("terminationMessagePolicy") == "FallbackToLogsOnError",
        f"{name}: set terminationMessagePolicy: FallbackToLogsOnError (the log tail when quiesce "
        f"could not write its summary)",
    )

    # --- sockets on writable volumes ----------------------------------------------------------
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    writable = {
        m["mountPath"].rstrip("/")
        for m in c.get("volumeMounts", [])
        if "emptyDir" in volumes.get(m["name"], {}) and not m.get("readOnly", False)
    }
    sec = c.get("securityContext", {})
    sockets = {"admin_socket": cfg.get("admin_socket", DEFAULTS["admin_socket"])}
    if cfg.get("control", {}).get("socket"):
        sockets["control.socket"] = cfg["control"]["socket"]
    if sec.get("readOnlyRootFilesystem"):
        for key, path in sockets.items():
            r.check(
                os.path.dirname(path) in writable,
                f"{name}: {key} {path} is on the read-only root filesystem; mount an emptyDir at "
                f"{os.path.dirname(path)}",
            )
    else:
        r.check(False, f"{name}: set securityContext.readOnlyRootFilesystem: true on the container")

    # --- security and resources ---------------------------------------------------------------
    psec = pod.get("securityContext", {})
    r.check(
        sec.get("runAsNonRoot", psec.get("runAsNonRoot")) is True,
        f"{name}: set runAsNonRoot: true (the image runs as uid 65532)",
    )
    r.check(
        sec.get("allowPrivilegeEscalation") is False,
        f"{name}: set allowPrivilegeEscalation: false on the container",
    )
    res = c.get("resources", {})
    r.check(
        "cpu" not in res.get("limits", {}),
        f"{name}: remove the CPU limit (CFS throttling stalls the runtime and the probe answers); keep the request",
    )
    r.check("cpu" in res.get("requests", {}), f"{name}: set a CPU request: the HPA measures utilisation against it")
    r.check("memory" in res.get("limits", {}), f"{name}: set a memory limit")

    # --- companions select the pods -----------------------------------------------------------
    pod_labels = dep["spec"]["template"]["metadata"].get("labels", {})

    def selects(sel: dict) -> bool:
        return bool(sel) and all(pod_labels.get(k) == v for k, v in sel.items())

    for d in docs:
        kind, dname = d.get("kind"), d["metadata"]["name"]
        if kind == "PodDisruptionBudget":
            r.check(
                selects(d["spec"].get("selector", {}).get("matchLabels", {})),
                f"PodDisruptionBudget/{dname}: selector does not match the pods of {name}",
            )
        elif kind == "Service":
            r.check(selects(d["spec"].get("selector", {})), f"Service/{dname}: selector does not match the pods of {name}")
            for sp in d["spec"].get("ports", []):
                tp = sp.get("targetPort", sp["port"])
                ok = tp in ports.values() if isinstance(tp, str) else tp in ports
                r.check(ok, f"Service/{dname}: targetPort {tp!r} is not a container port of {name}")
        elif kind == "HorizontalPodAutoscaler":
            ref = d["spec"]["scaleTargetRef"]
            r.check(
                ref.get("kind") == "Deployment" and ref.get("name") == dep["metadata"]["name"],
                f"HorizontalPodAutoscaler/{dname}: scaleTargetRef does not point at {name}",
            )
    return grace


def check_dockerfile(r: Report, dockerfile: str, docs: list[dict]) -> None:
    """The image's ENTRYPOINT/CMD/USER are what the Deployment spells out explicitly."""
    import json

    dep, c = find_quiesce_deployment(docs)
    text = Path(dockerfile).read_text()
    # Instructions of the last stage (the runtime image).
    final = text[text.rindex("\nFROM "):]
    found: dict[str, str] = {}
    for line in final.splitlines():
        m = re.match(r"^(ENTRYPOINT|CMD|USER)\s+(.*)$", line.strip())
        if m:
            found[m.group(1)] = m.group(2)
    try:
        entry = json.loads(found.get("ENTRYPOINT", "null"))
        cmd = json.loads(found.get("CMD", "null"))
    except json.JSONDecodeError as e:
        r.check(False, f"{dockerfile}: ENTRYPOINT/CMD must be JSON arrays (exec form, no shell): {e}")
        return
    r.check(
        entry == c.get("command"),
        f"{dockerfile}: ENTRYPOINT {entry} differs from the Deployment's command {c.get('command')}",
    )
    r.check(cmd == c.get("args"), f"{dockerfile}: CMD {cmd} differs from the Deployment's args {c.get('args')}")
    user = found.get("USER", "").split(":")[0]
    want = str(c.get("securityContext", {}).get("runAsUser", dep["spec"]["template"]["spec"].get("securityContext", {}).get("runAsUser")))
    r.check(user == want, f"{dockerfile}: USER {user!r} differs from the Deployment's runAsUser {want}")


def check_compose(r: Report, compose_file: str) -> None:
    """stop_grace_period of the service started by quiesce equals the grace of its config."""
    base = Path(compose_file).parent
    doc = yaml.safe_load(Path(compose_file).read_text())
    found = False
    for sname, svc in doc.get("services", {}).items():
        entry = svc.get("entrypoint") or []
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env if "=" in e)
        if not (svc.get("build") or any("quiesce" in str(x) for x in entry)):
            continue
        found = True
        cfg_file = base / "docker" / "quiesce.toml"
        for vol in svc.get("volumes", []) or []:
            src, _, dst = str(vol).partition(":")
            if dst.split(":")[0] == "/etc/quiesce/quiesce.toml":
                cfg_file = base / src
        cfg = tomllib.loads(cfg_file.read_text())
        grace = parse_duration(env.get("QUIESCE_GRACE_PERIOD", cfg.get("grace_period", "30s")), "grace_period")
        sgp = svc.get("stop_grace_period", "10s")
        r.check(
            parse_duration(str(sgp), f"services.{sname}.stop_grace_period") == grace,
            f"{compose_file}: services.{sname}.stop_grace_period is {sgp} but quiesce's grace_period "
            f"is {fmt(grace)} ({cfg_file}); Docker SIGKILLs at stop_grace_period, make them equal",
        )
    r.check(found, f"{compose_file}: no service built from the Dockerfile / run under quiesce")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kustomize_dir")
    ap.add_argument("--compose")
    ap.add_argument("--dockerfile")
    a = ap.parse_args()
    r = Report()
    try:
        docs = render(a.kustomize_dir)
        grace = check_deployment(r, docs)
        if a.dockerfile:
            check_dockerfile(r, a.dockerfile, docs)
        if a.compose:
            check_compose(r, a.compose)
    except ValueError as e:
        r.problems.append(f"quiesce.toml: {e}")
        grace = float("nan")
    except subprocess.CalledProcessError as e:
        print(f"k8s-policy: kubectl kustomize {a.kustomize_dir} failed:\n{e.stderr}", file=sys.stderr)
        return 1
    for p in r.problems:
        print(f"FAIL {p}")
    print(f"k8s-policy: {r.passed} checks ok, {len(r.problems)} problem(s) (grace_period {fmt(grace)})")
    return 1 if r.problems else 0


if __name__ == "__main__":
    sys.exit(main())
