"""A real Prometheus server (Debian's) scrapes a running daemon with deploy/'s scrape settings."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from nanoscout.clients.acquisition.publisher import FramePublisher
from nanoscout.clients.subscriber import Subscriber
from tests.conftest import wait_until
from tests.system.conftest import DaemonFactory

pytestmark = pytest.mark.system

PROMETHEUS = shutil.which("prometheus")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read().decode())
    except OSError:
        return None


def _disks(k: int) -> np.ndarray:
    """A 256 x 256 frame with 12 bright disks of radius 8 px (ECD 8 nm at 0.5 nm/px)."""
    yy, xx = np.mgrid[:256, :256]
    img = np.random.default_rng(k).poisson(100, (256, 256)).astype(np.uint16)
    for j in range(12):
        cy, cx = 30 + 65 * (j // 4), 30 + 65 * (j % 4)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] += 400
    return img


@pytest.mark.skipif(PROMETHEUS is None, reason="Prometheus is not installed (apt-get install prometheus)")
def test_prometheus_scrapes_the_daemon(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    """Counters, the size gauges (D50 per source) and this deployment's alert thresholds
    (daemon config -> nanoscout_alert_threshold -> the rules' recorded thresholds)."""
    d = daemon_factory("--policy", "lossless", config="[metrics]\nalert_latency_p99_s = 1.5\n")
    assert PROMETHEUS is not None and d.metrics is not None
    target = urllib.parse.urlparse(d.metrics).netloc
    port = _free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files:\n  - "
        + str(Path(__file__).resolve().parents[2] / "deploy" / "nanoscout-rules.yml") + "\n"
        "scrape_configs:\n  - job_name: nanoscout\n    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    n = 7
    with Subscriber(d.output, topics=("det.",)) as sub, FramePublisher(d.input, source="prom") as pub:
        sub.wait_ready()
        for k in range(n):
            pub.send(_disks(k), pixel_size_nm=0.5)
        got = [m for _, m in zip(range(n), sub.messages(timeout=60), strict=False)]
    assert len(got) == n
    prom = subprocess.Popen(
        [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        query = base + "/api/v1/query?query=" + urllib.parse.quote(
            'nanoscout_frames_processed_total{source="prom"}')

        def scraped() -> list | None:
            r = _get(query)
            return r["data"]["result"] if r and r.get("status") == "success" and r["data"]["result"] else None

        result = wait_until(scraped, timeout=60, interval=0.5, what="a scrape of the daemon")
        assert float(result[0]["value"][1]) == n
        rules = wait_until(lambda: _get(base + "/api/v1/rules"), timeout=30, what="rules API")
        names = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
        # deploy/nanoscout-rules.yml loaded by a real server
        assert {"NanoscoutDown", "NanoscoutConnectionsRefused"} <= names, names
        up = wait_until(lambda: (_get(base + "/api/v1/query?query=up") or {}).get("data", {}).get("result"),
                        timeout=30, what="up metric")
        assert up[0]["value"][1] == "1"

        def value(q: str) -> float | None:
            r = _get(base + "/api/v1/query?query=" + urllib.parse.quote(q))
            res = r["data"]["result"] if r and r.get("status") == "success" else []
            return float(res[0]["value"][1]) if res else None

        d50 = wait_until(lambda: value('nanoscout_ecd_d50{source="prom", units="nm"}'),
                         timeout=30, what="the D50 gauge")
        assert 6.5 < d50 < 9.5  # disks of 8 nm
        last_frame = value('nanoscout_particles_last_frame{source="prom"}')
        assert last_frame is not None and last_frame >= 10
        window = value('nanoscout_window_particles{source="prom"}')
        assert window is not None and window >= 10 * n
        assert wait_until(lambda: value("instance:nanoscout_alert_threshold:latency_p99_seconds"),
                          timeout=30, what="the recorded threshold") == 1.5
        assert value("instance:nanoscout_alert_threshold:queue_depth") == 8
        # what NanoscoutConnectionsRefused reads, scraped from the daemon at 0 for each socket
        for socket in ("input", "results", "query"):
            assert value(f'nanoscout_connections_total{{socket="{socket}", '
                         'event="handshake_failed_auth"}') == 0, socket
    finally:
        prom.terminate()
        prom.wait(30)


CRITICAL_RULE = """
[[alerts]]
name = "wires"
kind = "count"
severity = "critical"
above = 1000
"""


def test_every_labelled_counter_exists_at_zero_from_the_start(daemon_factory: DaemonFactory) -> None:
    """Before any frame: every rule's alert counter, every drop and rejection reason at 0, so
    Prometheus' increase() sees the first alert after a start (see the promtool test below)."""
    d = daemon_factory("--policy", "live", config=CRITICAL_RULE)
    text = d.scrape()
    assert 'nanoscout_alerts_total{rule="wires",severity="critical"} 0.0' in text
    assert 'nanoscout_alerts_suppressed_total{rule="wires"} 0.0' in text
    for reason in ("superseded", "engine_failure", "shutdown", "internal"):
        assert f'nanoscout_frames_dropped_total{{reason="{reason}"}} 0.0' in text
    for reason in ("malformed", "header", "oversized", "nonfinite", "duplicate", "internal"):
        assert f'nanoscout_messages_rejected_total{{reason="{reason}"}} 0.0' in text
    for action, step in (("swap", "sha256"), ("swap", "probe"), ("revert", "history")):
        assert (f'nanoscout_model_swap_failures_total{{action="{action}",step="{step}"}} 0.0'
                in text)
    for reason in ("disk_budget", "write_error"):
        assert f'nanoscout_frame_save_failures_total{{reason="{reason}"}} 0.0' in text


def test_a_taken_metrics_port_is_a_config_error_as_a_taken_zeromq_port_is() -> None:
    """Once a raw OSError traceback from ``serve``; the CLI says ConfigErrors in one line."""
    from nanoscout.daemon.metrics import Metrics
    from nanoscout.wire.errors import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        metrics = Metrics()
        with pytest.raises(ConfigError, match=f"cannot bind the metrics server to 127.0.0.1:{port}"):
            metrics.serve("127.0.0.1", port)
    assert metrics.serve("127.0.0.1", 0) > 0  # the same metrics serve on a free port
    metrics.close()


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")
def test_the_first_critical_alert_after_a_start_pages(tmp_path: Path) -> None:
    """deploy/'s NanoscoutCriticalFinding fires on a counter that starts at 0 (as the daemon's
    do now) and steps to 1; a counter created only at its first step (as before) never does."""
    assert PROMTOOL is not None
    rules = Path(__file__).resolve().parents[2] / "deploy" / "nanoscout-rules.yml"
    test = tmp_path / "first_alert_test.yml"
    series = 'nanoscout_alerts_total{instance="d:9108",job="nanoscout",rule="wires",severity="critical"}'
    test.write_text(f"""rule_files:
  - {rules}
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      - series: '{series}'
        values: '0 0 0 1 1 1 1 1'
    alert_rule_test:
      - eval_time: 1m
        alertname: NanoscoutCriticalFinding
        exp_alerts:
          - exp_labels: {{instance: "d:9108", rule: wires, severity: critical}}
            exp_annotations:
              summary: "nanoscout d:9108: rule wires fired"
              description: "1 critical finding(s) in the last minute; details on the alert.<source> topic."
  - interval: 15s
    input_series:
      - series: '{series}'
        values: '_ _ _ 1 1 1 1 1'
    alert_rule_test:
      - eval_time: 1m
        alertname: NanoscoutCriticalFinding
        exp_alerts: []
""", encoding="utf-8")
    out = subprocess.run([PROMTOOL, "test", "rules", str(test)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")
def test_a_refused_swap_and_a_model_change_raise_their_alerts(tmp_path: Path) -> None:
    """deploy/'s NanoscoutModelSwapFailed fires on the first refused swap after a start (its
    counter exists at 0), and NanoscoutModelChanged on a step of the model generation."""
    assert PROMTOOL is not None
    rules = Path(__file__).resolve().parents[2] / "deploy" / "nanoscout-rules.yml"
    test = tmp_path / "swap_test.yml"
    failures = ('nanoscout_model_swap_failures_total{instance="d:9108",job="nanoscout",'
                'action="swap",step="sha256"}')
    generation = 'nanoscout_model_generation{instance="d:9108",job="nanoscout"}'
    refused = ("1 swap(s) refused in 10 minutes; the model in use is unchanged "
               "(health.last_error and the daemon log say why).")
    changed = ("1 model change(s) in 10 minutes (hot swap or revert); size statistics across "
               "the change come from different models.")
    test.write_text(f"""rule_files:
  - {rules}
evaluation_interval: 15s
tests:
  - interval: 1m
    input_series:
      - series: '{failures}'
        values: '0 0 0 1 1 1 1 1'
      - series: '{generation}'
        values: '0 0 0 0 0 1 1 1'
    alert_rule_test:
      - eval_time: 2m
        alertname: NanoscoutModelSwapFailed
        exp_alerts: []
      - eval_time: 4m
        alertname: NanoscoutModelSwapFailed
        exp_alerts:
          - exp_labels: {{instance: "d:9108", action: swap, step: sha256, severity: warning}}
            exp_annotations:
              summary: "nanoscout d:9108: a model swap failed at step sha256"
              description: "{refused}"
      - eval_time: 4m
        alertname: NanoscoutModelChanged
        exp_alerts: []
      - eval_time: 6m
        alertname: NanoscoutModelChanged
        exp_alerts:
          - exp_labels: {{instance: "d:9108", job: nanoscout, severity: info}}
            exp_annotations:
              summary: "nanoscout d:9108 now analyses with another detection model"
              description: "{changed}"
""", encoding="utf-8")
    out = subprocess.run([PROMTOOL, "test", "rules", str(test)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _refused_description(n: int, socket: str) -> str:
    """NanoscoutConnectionsRefused's description of ``n`` refusals on ``socket``."""
    return (f"{n} connection(s) to the {socket} socket refused at the handshake in 10 minutes. "
            "handshake_failed_auth: the client's public key (.key) is not in the daemon's "
            "authorized_keys folder ([security] authorized_keys, read at start: restart the "
            "daemon after adding a key). handshake_failed: the client holds another server "
            "public key than this daemon's (a rotated server key), has no CURVE keys, or is "
            "not a client of this socket's type. Clients that closed or timed out during "
            "their handshake (handshake_aborted: short-lived clients, TCP probes) were not "
            "refused and do not count here. The daemon log names the socket.")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")
def test_refused_connections_raise_their_alert_per_socket(tmp_path: Path) -> None:
    """deploy/'s NanoscoutConnectionsRefused fires on the first CURVE key refused after a
    start (the counters exist at 0), naming the socket and the event: a subscriber's key on
    the results socket, a query client with another server key (handshake_failed) on the
    query socket; the input's handshake_failed (routine: an adapter in --mode auto is refused
    once as PUSH by a live daemon) does not. Nor does ``handshake_aborted`` (clients that
    closed during their handshake, TCP probes: 2192 of 3000 churned subscriber connections
    in an audit), beside the refusals in the first case or alone, on every socket, in the
    second."""
    assert PROMTOOL is not None
    rules = Path(__file__).resolve().parents[2] / "deploy" / "nanoscout-rules.yml"
    test = tmp_path / "connections_test.yml"

    def series(socket: str, event: str) -> str:
        return (f'nanoscout_connections_total{{instance="d:9108",job="nanoscout",'
                f'socket="{socket}",event="{event}"}}')

    def alert(socket: str, event: str, n: int) -> str:
        return (f'\n          - exp_labels: {{instance: "d:9108", socket: {socket}, event: {event}, '
                'severity: warning}\n            exp_annotations:\n'
                f'              summary: "nanoscout d:9108: connections refused on the {socket} '
                f'socket ({event})"\n'
                f'              description: "{_refused_description(n, socket)}"')

    # only handshake_aborted increases, on every socket; the other events stay at 0
    aborted = "".join(
        f"\n      - series: '{series(socket, event)}'\n        values: '{values}'"
        for socket in ("input", "results", "query")
        for event, values in (("handshake_aborted", "0 0 0 700 1400 2192 2192 2192 2192 2192"),
                              ("handshake_failed", "0x9"), ("handshake_failed_auth", "0x9")))
    silent = "".join(f"\n      - eval_time: {m}m\n        alertname: NanoscoutConnectionsRefused"
                     "\n        exp_alerts: []" for m in (2, 4, 6, 9))
    test.write_text(f"""rule_files:
  - {rules}
evaluation_interval: 15s
tests:
  - interval: 1m
    input_series:
      - series: '{series("results", "handshake_failed_auth")}'
        values: '0 0 0 1 1 1 1 1'
      - series: '{series("input", "handshake_failed")}'
        values: '0 0 0 5 5 5 5 5'
      - series: '{series("query", "handshake_failed")}'
        values: '0 0 0 0 0 2 2 2'
      - series: '{series("input", "handshake_failed_auth")}'
        values: '0 0 0 0 0 0 0 0'
      - series: '{series("results", "handshake_aborted")}'
        values: '0 0 0 700 1400 2192 2192 2192'
    alert_rule_test:
      - eval_time: 2m
        alertname: NanoscoutConnectionsRefused
        exp_alerts: []
      - eval_time: 4m
        alertname: NanoscoutConnectionsRefused
        exp_alerts:{alert("results", "handshake_failed_auth", 1)}
      - eval_time: 6m
        alertname: NanoscoutConnectionsRefused
        exp_alerts:{alert("results", "handshake_failed_auth", 1)}{alert("query", "handshake_failed", 2)}
  - interval: 1m
    input_series:{aborted}
    alert_rule_test:{silent}
""", encoding="utf-8")
    out = subprocess.run([PROMTOOL, "test", "rules", str(test)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
