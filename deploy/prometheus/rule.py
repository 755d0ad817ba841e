"""Write the PrometheusRule of deploy/k8s/components/prometheus-rules from alerts.yml.

    python deploy/prometheus/rule.py            rewrite the PrometheusRule
    python deploy/prometheus/rule.py --check    exit 1 if it differs from alerts.yml

alerts.yml is the one owner of the rules; the PrometheusRule is its `groups:` section,
indented under `spec:`, so the two can never say different things (`make lint` runs --check).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "alerts.yml"
TARGET = HERE.parent / "k8s" / "components" / "prometheus-rules" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by deploy/prometheus/rule.py: edit alerts.yml,
# then run `python deploy/prometheus/rule.py`. The runbooks are in the README ("Alerts").
#
# Prometheus Operator PrometheusRule (needs the monitoring.coreos.com/v1 CRD). Your
# Prometheus's ruleSelector may require an extra label (often `release`).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: sequin-worker
  labels:
    app.kubernetes.io/name: sequin-worker
    app.kubernetes.io/part-of: sequin-worker
spec:
"""


def render() -> str:
    lines = SOURCE.read_text().splitlines()
    start = lines.index("groups:")
    body = "".join(f"  {line}\n" if line else "\n" for line in lines[start:])
    return HEADER + body


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is not alerts.yml's rules: run python deploy/prometheus/rule.py")
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
