"""Grafana dashboards under deploy/grafana/dashboards: every Prometheus query parses.

Writes every PromQL expression of every dashboard (panel targets and the selectors of
`label_values(...)` template variables) into one Prometheus rule file, one recording rule per
query, for `promtool check rules` to parse. Grafana's variables are substituted first:
$__rate_interval, $__interval and $__range by durations, template variables by a regex that
matches anything (they are only used after =~). An unknown variable is an error, and so is a
datasource reference that is not a template variable (a hard-coded uid breaks on every other
Grafana).

With --provisioning DIR, also: every datasource that a provisioned datasource links to
(derived fields, traces to logs) is provisioned, by uid.

Usage: dashboards.py [--provisioning DIR] OUT_RULES_FILE DASHBOARD.json...
"""

import json
import re
import sys
from pathlib import Path

import yaml

BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
    "__interval_ms": "30000",
}
VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", re.S)


def panels(items):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


def ds_uid(ref):
    if isinstance(ref, dict):
        return ref.get("uid")
    return ref  # old dashboards name the datasource by a string


def substitute(expr, variables, where, errors):
    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name in BUILTINS:
            return BUILTINS[name]
        if name in variables:
            return ".*"
        errors.append(f"{where}: unknown variable ${name} in {expr!r}")
        return m.group(0)

    return VAR.sub(repl, expr)


def check(path, errors):
    d = json.loads(Path(path).read_text())
    uid = d.get("uid") or Path(path).stem
    tvars = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
    ds_vars = {n for n, v in tvars.items() if v.get("type") == "datasource"}
    prom_vars = {n for n, v in tvars.items() if v.get("type") == "datasource" and v.get("query") == "prometheus"}
    if not prom_vars:
        errors.append(f"{path}: no Prometheus datasource template variable")

    def prometheus(ref):
        uid_ = ds_uid(ref) or ""
        m = re.fullmatch(r"\$\{?(\w+)\}?", uid_)
        return bool(m) and m.group(1) in prom_vars

    def check_ref(ref, where):
        uid_ = ds_uid(ref)
        if uid_ is None:
            return
        m = re.fullmatch(r"\$\{?(\w+)\}?", uid_)
        if not m or m.group(1) not in ds_vars:
            errors.append(f"{where}: datasource {uid_!r} is not a datasource template variable")

    queries = []
    for name, v in tvars.items():
        if v.get("type") != "query":
            continue
        where = f"{path}: variable {name}"
        check_ref(v.get("datasource"), where)
        if not prometheus(v.get("datasource")):
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = LABEL_VALUES.match(q or "")
        if m:
            q = m.group(1)
        queries.append((f"var_{name}", where, q))
    for p in panels(d.get("panels", [])):
        check_ref(p.get("datasource"), f"{path}: panel {p.get('id')} {p.get('title')!r}")
        for t in p.get("targets", []):
            where = f"{path}: panel {p.get('id')} {p.get('title')!r} target {t.get('refId')}"
            ref = t.get("datasource") or p.get("datasource")
            check_ref(t.get("datasource"), where)
            if not prometheus(ref):
                continue
            if not t.get("expr", "").strip():
                errors.append(f"{where}: empty expr")
                continue
            queries.append((f"panel{p.get('id')}_{t.get('refId')}", where, t["expr"]))
    rules = []
    for key, where, expr in queries:
        rules.append(
            {
                "record": "dashboard:" + re.sub(r"\W", "_", f"{uid}:{key}").replace("__", "_"),
                "expr": substitute(expr, tvars, where, errors),
            }
        )
    return {"name": f"dashboard {uid} ({path})", "rules": rules}


def check_provisioning(directory, errors):
    sources = []
    for f in sorted(Path(directory, "datasources").glob("*.y*ml")):
        sources += [(f, d) for d in yaml.safe_load(f.read_text()).get("datasources", [])]
    uids = {d.get("uid") for _, d in sources}

    def links(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "datasourceUid":
                    yield v
                yield from links(v)
        elif isinstance(node, list):
            for v in node:
                yield from links(v)

    for f, d in sources:
        for uid in links(d.get("jsonData", {})):
            if uid not in uids:
                errors.append(f"{f}: datasource {d.get('name')!r} links to uid {uid!r}, which is not provisioned")


def main():
    args = sys.argv[1:]
    errors = []
    if args[:1] == ["--provisioning"]:
        check_provisioning(args[1], errors)
        args = args[2:]
    out, files = args[0], args[1:]
    groups = [check(f, errors) for f in files]
    for e in errors:
        print(f"FAIL: {e}", file=sys.stderr)
    Path(out).write_text(yaml.safe_dump({"groups": groups}, sort_keys=False, width=1000))
    n = sum(len(g["rules"]) for g in groups)
    print(f"{n} Prometheus queries in {len(files)} dashboards")
    return 1 if errors or n == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
