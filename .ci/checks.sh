#!/usr/bin/env bash
# Lint and policy checks for everything that is not Rust code: the proto API, the SQL
# migrations, the Kubernetes manifests and their agreement with the supervisor config, the
# Prometheus rules, the Grafana dashboards, the compose file, and the dependency tree's licences
# and sources.
#
#   .ci/checks.sh                 # every check; exit 1 if any failed
#   .ci/checks.sh buf-lint k8s-policy
#   .ci/checks.sh --list
#
# Tools install themselves on first use, quietly, into $QUIESCE_CI_CACHE (default
# ~/.cache/quiesce-ci), pinned to the versions below, so a warm run takes seconds:
#   buf (npm @bufbuild/buf), squawk + kubernetes-validate + jsonschema (PyPI, venv keyed on
#   .ci/checks-requirements.txt), promtool (Debian package `prometheus`, unpacked, no server started),
#   cargo-deny (cargo install --locked; only if not already on PATH).
# kubectl (for `kubectl kustomize`) comes with the machine.
#
# Environment:
#   QUIESCE_CI_CACHE      tool cache directory
#   QUIESCE_BUF_AGAINST   buf input to check breaking changes against (default: see check_buf_breaking)
#   QUIESCE_BIN           a built `quiesce` binary: also run `quiesce check-config` on the shipped configs
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${QUIESCE_CI_CACHE:-$HOME/.cache/quiesce-ci}
BUF_VERSION=1.75.0
CARGO_DENY_VERSION=0.20.2
KUBE_VERSION=1.32.0   # oldest Kubernetes the manifests must be valid for
cd "$ROOT"
mkdir -p "$CACHE"

ALL_CHECKS=(buf-lint buf-format buf-breaking migrations manifests k8s-policy prom-rules dashboards compose quiesce-config cargo-deny)

header() { printf '\n==> %s\n' "$*"; }
# A check that has nothing to look at ends its subshell with status 77 (reported as skipped, as in automake).
skip() { printf 'SKIP: %s\n' "$*"; exit 77; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

# --- tool installers (idempotent, cached) ---------------------------------------------------

need_buf() {
    BUF="$CACHE/npm/node_modules/.bin/buf"
    if [[ ! -x $BUF ]] || [[ $("$BUF" --version 2>/dev/null) != "$BUF_VERSION" ]]; then
        echo "installing buf $BUF_VERSION (npm) into $CACHE/npm"
        npm install --prefix "$CACHE/npm" --no-audit --no-fund --silent "@bufbuild/buf@$BUF_VERSION" >/dev/null
    fi
}

need_venv() {
    local hash
    hash=$(sha256sum "$ROOT/.ci/checks-requirements.txt" | cut -c1-12)
    VENV="$CACHE/venv-$hash"
    if [[ ! -f $VENV/.complete ]]; then
        echo "installing $(grep -v '^#' "$ROOT/.ci/checks-requirements.txt" | xargs) (PyPI) into $VENV"
        rm -rf "$CACHE"/venv-*   # older pins
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/.ci/checks-requirements.txt"
        touch "$VENV/.complete"
    fi
}

need_promtool() {
    if command -v promtool >/dev/null; then
        PROMTOOL=$(command -v promtool)
        return
    fi
    PROMTOOL="$CACHE/prometheus/usr/bin/promtool"
    [[ -x $PROMTOOL ]] && return
    # Unpack the Debian package instead of installing it: we need the binary, not a Prometheus
    # server started by the package's maintainer scripts (it would take port 9090).
    echo "fetching promtool (Debian package prometheus) into $CACHE/prometheus"
    local tmp
    tmp=$(mktemp -d)
    if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
        apt-get update -qq >/dev/null
        (cd "$tmp" && apt-get download prometheus >/dev/null)
    fi
    dpkg-deb -x "$tmp"/prometheus_*.deb "$CACHE/prometheus"
    rm -rf "$tmp"
}

need_cargo_deny() {
    if command -v cargo-deny >/dev/null; then
        CARGO_DENY=$(command -v cargo-deny)
        return
    fi
    CARGO_DENY="$CACHE/cargo/bin/cargo-deny"
    if [[ ! -x $CARGO_DENY ]]; then
        echo "installing cargo-deny $CARGO_DENY_VERSION (cargo install, a few minutes once) into $CACHE/cargo"
        cargo install --quiet --locked "cargo-deny@$CARGO_DENY_VERSION" --root "$CACHE/cargo"
    fi
}

has_proto() { [[ -d proto ]] && [[ -n $(find proto -name '*.proto' -print -quit) ]]; }

# --- checks -----------------------------------------------------------------------------------

check_buf_lint() {
    header "buf lint (proto/)"
    has_proto || skip "no .proto files under proto/"
    [[ -f buf.yaml ]] || die "proto/ exists but there is no buf.yaml at the repository root; add one (version: v2, modules: [{path: proto}])"
    need_buf
    "$BUF" lint
    echo "ok"
}

check_buf_format() {
    header "buf format --diff --exit-code"
    has_proto || skip "no .proto files under proto/"
    need_buf
    "$BUF" format --diff --exit-code || die "proto files are not buf-formatted; run: buf format -w"
    echo "ok"
}

# Which committed API to compare against:
#   QUIESCE_BUF_AGAINST if set (any buf input, e.g. '.git#tag=v0.1.0');
#   otherwise branch main (or origin/main), when HEAD is not main or proto/ and buf.yaml have
#   uncommitted changes (a feature branch, or a local run before committing);
#   otherwise (CI on a clean main) the previous commit, HEAD~1.
# Skipped when the base has no proto/ yet (the API is new: nothing to break).
check_buf_breaking() {
    header "buf breaking"
    has_proto || skip "no .proto files under proto/"
    need_buf
    local against base
    if [[ -n ${QUIESCE_BUF_AGAINST:-} ]]; then
        against=$QUIESCE_BUF_AGAINST
    else
        local main_ref
        if git rev-parse --verify -q refs/heads/main >/dev/null; then
            main_ref=main
        elif git rev-parse --verify -q refs/remotes/origin/main >/dev/null; then
            main_ref=origin/main
        else
            skip "no branch main in this clone; set QUIESCE_BUF_AGAINST to compare with a base"
        fi
        if [[ $(git rev-parse HEAD) != $(git rev-parse "$main_ref") ]] \
            || [[ -n $(git status --porcelain -- proto buf.yaml) ]]; then
            base=$main_ref
            against=".git#ref=$main_ref"
        else
            base=HEAD~1
            against='.git#ref=HEAD~1'
        fi
        if ! git rev-parse --verify -q "$base^{commit}" >/dev/null \
            || ! git cat-file -e "$base:buf.yaml" 2>/dev/null \
            || [[ -z $(git ls-tree -r --name-only "$base" -- proto | grep '\.proto$' || true) ]]; then
            skip "$base has no proto/ and buf.yaml yet: nothing to be backward compatible with"
        fi
    fi
    echo "against $against"
    "$BUF" breaking --against "$against"
    echo "ok"
}

# sqlx runs each migration in a transaction unless its first line is `-- no-transaction`; squawk
# is told the same per file, so it judges each file as it will actually run.
check_migrations() {
    header "squawk (migrations/)"
    local -a in_tx=() no_tx=()
    local f
    shopt -s nullglob
    for f in migrations/*.sql; do
        if [[ $(head -n1 "$f") == "-- no-transaction"* ]]; then no_tx+=("$f"); else in_tx+=("$f"); fi
    done
    shopt -u nullglob
    if (( ${#in_tx[@]} + ${#no_tx[@]} == 0 )); then
        skip "no migrations/*.sql"
    fi
    need_venv
    local rc=0
    if (( ${#in_tx[@]} )); then
        "$VENV/bin/squawk" --reporter gcc --assume-in-transaction "${in_tx[@]}" || rc=1
    fi
    if (( ${#no_tx[@]} )); then
        "$VENV/bin/squawk" --reporter gcc "${no_tx[@]}" || rc=1
    fi
    (( rc == 0 )) || die "squawk rejects the migrations above (each rule is explained at https://squawkhq.com/docs/rules). Destructive changes (DROP/RENAME/type change) need an expand/contract sequence over two releases, not an in-place change"
    echo "ok: $(( ${#in_tx[@]} + ${#no_tx[@]} )) files"
}

need_kubectl() {
    command -v kubectl >/dev/null \
        || die "kubectl not found: it renders the kustomization (kubectl kustomize); install kubectl"
}

check_manifests() {
    header "kubectl kustomize deploy/k8s | kubernetes-validate --strict"
    need_kubectl
    need_venv
    local rendered
    rendered=$(mktemp --suffix=.yaml)
    kubectl kustomize deploy/k8s >"$rendered"
    local rc=0
    "$VENV/bin/kubernetes-validate" --strict --quiet "$rendered" || rc=1
    "$VENV/bin/kubernetes-validate" --strict --quiet -k "$KUBE_VERSION" "$rendered" || rc=1
    rm -f "$rendered"
    (( rc == 0 )) || die "rendered manifests do not validate against the Kubernetes schema"
    echo "ok"
}

check_k8s_policy() {
    header "grace period and manifest policy (.ci/k8s_policy.py)"
    need_kubectl
    need_venv
    "$VENV/bin/python" .ci/k8s_policy.py deploy/k8s --compose deploy/compose.yaml --dockerfile Dockerfile
}

check_prom_rules() {
    header "promtool check rules / test rules / check config"
    need_promtool
    need_venv
    "$PROMTOOL" check rules deploy/prometheus/rules/*.yml
    "$PROMTOOL" test rules deploy/prometheus/tests/*.yml
    # Debian's promtool is built without Kubernetes service discovery: check a copy of the config
    # with the SD block swapped for a static target (relabelling and rule files still checked).
    local tmp
    tmp=$(mktemp -d)
    cp -r deploy/prometheus/rules "$tmp/"
    "$VENV/bin/python" - deploy/prometheus/prometheus.yml "$tmp/prometheus.yml" <<'PY'
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
for sc in doc.get("scrape_configs", []):
    if sc.pop("kubernetes_sd_configs", None) is not None:
        sc["static_configs"] = [{"targets": ["localhost:9090"]}]
yaml.safe_dump(doc, open(sys.argv[2], "w"))
PY
    "$PROMTOOL" check config "$tmp/prometheus.yml"
    rm -rf "$tmp"
    # The local one (deploy/compose.yaml) has static targets: checked as it is.
    "$PROMTOOL" check config deploy/prometheus/prometheus.compose.yml
}

# Every Prometheus query of every dashboard parses: .ci/dashboards.py substitutes Grafana's
# variables and writes the queries as recording rules for promtool; it also rejects hard-coded
# datasource uids and unknown variables. That each metric a panel names is exported is
# tests/tests/dashboards.rs (it runs the binaries).
check_dashboards() {
    header "Grafana dashboards: every PromQL query parses (promtool check rules)"
    shopt -s nullglob
    local -a boards=(deploy/grafana/dashboards/*.json)
    shopt -u nullglob
    (( ${#boards[@]} )) || skip "no deploy/grafana/dashboards/*.json"
    need_promtool
    need_venv
    local tmp
    tmp=$(mktemp -d)
    "$VENV/bin/python" .ci/dashboards.py --provisioning deploy/grafana/provisioning \
        "$tmp/dashboards.rules.yml" "${boards[@]}" || { rm -rf "$tmp"; die "dashboards rejected (above)"; }
    "$PROMTOOL" check rules "$tmp/dashboards.rules.yml" \
        || { rm -rf "$tmp"; die "a dashboard query does not parse (the rule's record name is dashboard:<uid>_panel<id>_<refId>)"; }
    rm -rf "$tmp"
}

# No Docker engine here: the compose file is validated against the Compose Specification's JSON
# schema (.ci/compose-spec.json, schema/compose-spec.json of github.com/compose-spec/compose-spec
# at 170098ba07d9), with pinned image tags and existing bind-mount sources (.ci/compose_check.py).
check_compose() {
    header "deploy/compose.yaml against the Compose Specification schema"
    need_venv
    "$VENV/bin/python" .ci/compose_check.py deploy/compose.yaml .ci/compose-spec.json
}

check_quiesce_config() {
    header "quiesce check-config (shipped configs)"
    if [[ -z ${QUIESCE_BIN:-} ]]; then
        skip "QUIESCE_BIN not set (point it at a built quiesce binary to validate deploy/*/quiesce.toml)"
    fi
    local f
    for f in deploy/k8s/quiesce.toml deploy/docker/quiesce.toml; do
        "$QUIESCE_BIN" check-config --config "$f" || die "$f is rejected by quiesce check-config"
    done
    echo "ok"
}

check_cargo_deny() {
    header "cargo deny check licenses bans sources"
    need_cargo_deny
    # Duplicate versions are warnings (listed, not fatal); denied licences, banned crates and
    # unknown sources fail. --locked: a stale Cargo.lock is an error here, not silently updated.
    PATH="$(dirname "$CARGO_DENY"):$PATH" cargo deny --locked check --hide-inclusion-graph \
        licenses bans sources
}

# --- driver -----------------------------------------------------------------------------------

run_one() {
    local name=$1 fn="check_${1//-/_}"
    declare -F "$fn" >/dev/null || die "unknown check '$name' (known: ${ALL_CHECKS[*]})"
    local start=$SECONDS
    set +e
    ( set -euo pipefail; "$fn" )
    local rc=$?
    set -e
    if (( rc == 0 )); then
        PASSED+=("$name")
        printf -- '--- %s: ok (%ds)\n' "$name" $((SECONDS - start))
    elif (( rc == 77 )); then
        SKIPPED+=("$name")
        printf -- '--- %s: skipped\n' "$name"
    else
        FAILED+=("$name")
        printf -- '--- %s: FAILED (%ds)\n' "$name" $((SECONDS - start))
    fi
}

main() {
    if [[ ${1:-} == --list ]]; then
        printf '%s\n' "${ALL_CHECKS[@]}"
        return 0
    fi
    local -a selected=("$@")
    (( ${#selected[@]} )) || selected=("${ALL_CHECKS[@]}")
    PASSED=() FAILED=() SKIPPED=()
    local c
    for c in "${selected[@]}"; do run_one "$c"; done
    printf '\nchecks: %d ok, %d skipped%s, %d failed%s (%ds)\n' \
        "${#PASSED[@]}" "${#SKIPPED[@]}" "${SKIPPED[*]:+ (${SKIPPED[*]})}" \
        "${#FAILED[@]}" "${FAILED[*]:+: ${FAILED[*]}}" "$SECONDS"
    (( ${#FAILED[@]} == 0 ))
}

main "$@"
