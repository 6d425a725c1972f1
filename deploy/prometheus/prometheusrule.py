"""Print alerts.yml as a PrometheusRule (prometheus-operator), the rules unchanged.

    python deploy/prometheus/prometheusrule.py > deploy/kubernetes/monitoring/prometheusrule.yaml

tests/unit/test_deploy.py runs this and fails when the committed manifest differs. Needs
PyYAML (in the `test` extra).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

RULES = Path(__file__).with_name("alerts.yml")

HEADER = """\
# Made from deploy/prometheus/alerts.yml by deploy/prometheus/prometheusrule.py: edit those, then
#   python deploy/prometheus/prometheusrule.py > deploy/kubernetes/monitoring/prometheusrule.yaml
# (tests/unit/test_deploy.py fails while this file differs from what that prints).
# Your Prometheus picks it up when its ruleSelector matches these labels: with the
# kube-prometheus-stack chart, add `release: <the chart's release name>`.
"""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Runbook texts and multi-line expressions stay readable blocks, as in alerts.yml.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def manifest(rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "tracker", "labels": {"app.kubernetes.io/name": "tracker"}},
        "spec": {"groups": rules["groups"]},
    }


def render(path: Path = RULES) -> str:
    rules = yaml.safe_load(path.read_text())
    body = yaml.dump(manifest(rules), Dumper=_Dumper, sort_keys=False, width=100,
                     allow_unicode=True)
    return HEADER + body


if __name__ == "__main__":
    sys.stdout.write(render())
