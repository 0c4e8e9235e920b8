"""The monitoring role's alert rules, checked and exercised by Prometheus's own `promtool`
(no hosts needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tests.templates.test_templates import REPO, render

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

# Series as the fleet's targets carry them (roles/monitoring/vars/main.yml).
INSTANCE = 'wsfleet_target="instance",wsfleet_group="app_servers",instance="fleet1:8001"'
PROBE = 'wsfleet_target="tls",wsfleet_group="app_servers",host="fleet1"'

# Times in minutes of `interval: 1m`; time() is 0 at the start of a promtool test.
CASES = {
    "rule_files": ["wsfleet.rules.yml"],
    "evaluation_interval": "1m",
    "tests": [
        {
            "interval": "1m",
            "input_series": [
                # Up, then down from minute 3 on.
                {"series": f"up{{{INSTANCE}}}", "values": "1 1 1 0 0 0 0"},
                # 9,500 of 10,000 connections from minute 2 on.
                {"series": f"wsapp_connections_open{{{INSTANCE}}}", "values": "10 10 9500x5"},
                {"series": f"wsapp_connections_max{{{INSTANCE}}}", "values": "10000x7"},
                # A certificate ending 10 days after time 0.
                {"series": f"probe_ssl_earliest_cert_expiry{{{PROBE}}}", "values": "864000x7"},
                {"series": f"wsapp_bus_connected{{{INSTANCE}}}", "values": "1x7"},
            ],
            "alert_rule_test": [
                {"eval_time": "4m", "alertname": "WsfleetInstanceDown", "exp_alerts": []},
                {
                    "eval_time": "6m",
                    "alertname": "WsfleetInstanceDown",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "critical",
                                "wsfleet_target": "instance",
                                "wsfleet_group": "app_servers",
                                "instance": "fleet1:8001",
                            },
                            "exp_annotations": {
                                "summary": "fleet1:8001 does not answer its metrics scrape"
                            },
                        }
                    ],
                },
                {
                    "eval_time": "5m",
                    "alertname": "WsfleetInstanceAtCapacity",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "wsfleet_target": "instance",
                                "wsfleet_group": "app_servers",
                                "instance": "fleet1:8001",
                            },
                            "exp_annotations": {
                                "summary": "fleet1:8001 holds 95% of its connection limit"
                            },
                        }
                    ],
                },
                {
                    "eval_time": "3m",
                    "alertname": "WsfleetCertificateExpiring",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "wsfleet_target": "tls",
                                "wsfleet_group": "app_servers",
                                "host": "fleet1",
                            },
                            "exp_annotations": {
                                "summary": "The certificate of fleet1 expires in 9d 23h 57m 0s"
                            },
                        }
                    ],
                },
                {"eval_time": "6m", "alertname": "WsfleetBusDisconnected", "exp_alerts": []},
            ],
        }
    ],
}


def rules_vars() -> dict[str, object]:
    """The monitoring and tls roles' defaults (vars/main.yml needs a play's hostvars)."""
    found: dict[str, object] = {"ansible_managed": "Ansible managed"}
    for role in ("tls", "monitoring"):
        found.update(yaml.safe_load((REPO / "roles" / role / "defaults/main.yml").read_text()))
    return found


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, check=False, cwd=cwd)


def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    """promtool check rules passes on the rendered rules: four alerts, none unnamed."""
    rules = render("etc/prometheus/rules/wsfleet.rules.yml.j2", rules_vars())
    (tmp_path / "wsfleet.rules.yml").write_text(rules)
    result = promtool("check", "rules", "wsfleet.rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout
    assert "< 21 * 86400" in rules  # tls_expiry_warn_days's default


def test_the_rules_fire_on_their_conditions(tmp_path: Path) -> None:
    """promtool test rules: down, full and expiring fire after `for`, the bus stays quiet."""
    rules = render("etc/prometheus/rules/wsfleet.rules.yml.j2", rules_vars())
    (tmp_path / "wsfleet.rules.yml").write_text(rules)
    (tmp_path / "cases.yml").write_text(yaml.safe_dump(CASES))
    result = promtool("test", "rules", "cases.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_rule_is_refused(tmp_path: Path) -> None:
    """The same check fails on a rule Prometheus cannot parse (it can fail)."""
    rules = render("etc/prometheus/rules/wsfleet.rules.yml.j2", rules_vars())
    (tmp_path / "wsfleet.rules.yml").write_text(rules.replace("== 0", "== (", 1))
    assert promtool("check", "rules", "wsfleet.rules.yml", cwd=tmp_path).returncode != 0
