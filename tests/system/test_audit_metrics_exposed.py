"""What deploy/'s dashboard and rules query is what a running daemon exposes: checked on a real
``nanoscout serve``'s /metrics (parsed with prometheus_client's parser), and with a real
Prometheus server (Debian's) where it is installed.

tests/unit/test_deploy.py checks the names against the code's registry; these check the
exposition of a live daemon: the type behind each name (rate / increase only on counters,
histogram_quantile only on the buckets of a histogram), every label a query matches, groups or
joins on, the label values it matches, and that the stage histogram resolves as far as the
latency histogram it is a part of.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nanoscout.wire.transport import Policy
from tests.conftest import REPO, wait_until
from tests.system.conftest import DaemonProc, send_and_collect, start_daemon

yaml = pytest.importorskip("yaml", reason="pyyaml is needed to parse the Prometheus rules")

pytestmark = pytest.mark.system

DEPLOY = REPO / "deploy"
PROMETHEUS = shutil.which("prometheus")
# labels Prometheus itself attaches to every scraped series
_TARGET_LABELS = {"instance", "job"}
_SELECTOR = re.compile(r"(?<![\w:])(nanoscout_\w+)(\{[^}]*\})?")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|on|ignoring|without)\s*\(([^)]*)\)")
_RATE = re.compile(r"\b(?:rate|irate|increase)\(\s*(nanoscout_\w+)")
_QUANTILE = re.compile(r"histogram_quantile\(")

RULE = """
[[alerts]]
name = "crowded"
kind = "count"
severity = "critical"
above = 1000
"""


@dataclass
class Series:
    """One sample name of the exposition: its family's type, its labels and their values."""

    type: str
    labels: dict[str, set[str]] = field(default_factory=dict)


def exposition(text: str) -> dict[str, Series]:
    """Sample name -> :class:`Series` of a /metrics text (``_created`` samples left out)."""
    out: dict[str, Series] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            series = out.setdefault(sample.name, Series(family.type))
            for key, value in sample.labels.items():
                series.labels.setdefault(key, set()).add(value)
    return out


def queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard target and every rule of deploy/."""
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text(encoding="utf-8"))
    out = [(f"panel {sub['title']!r}", target["expr"])
           for panel in dash["panels"] for sub in [panel, *panel.get("panels", [])]
           for target in sub.get("targets", [])]
    rules = yaml.safe_load((DEPLOY / "nanoscout-rules.yml").read_text(encoding="utf-8"))
    out += [(f"rule {r.get('alert') or r.get('record')}", r["expr"])
            for group in rules["groups"] for r in group["rules"]]
    return out


def _disks(k: int) -> np.ndarray:
    """A 192 x 192 frame with 9 bright disks of radius 7 px."""
    yy, xx = np.mgrid[:192, :192]
    img = np.random.default_rng(k).poisson(100, (192, 192)).astype(np.uint16)
    for j in range(9):
        cy, cx = 32 + 64 * (j // 3), 32 + 64 * (j % 3)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 49] += 400
    return img


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    """A lossless daemon with one alert rule that analysed frames of a calibrated source
    ("nm") and of an uncalibrated one ("px", no pixel size)."""
    d = start_daemon(tmp_path_factory.mktemp("daemon"), "--policy", "lossless", config=RULE)
    try:
        sends = [(source, _disks(k), {"pixel_size_nm": size})
                 for k in range(2) for source, size in (("nm", 0.5), ("px", None))]
        assert len(send_and_collect(d, sends, timeout=60)) == len(sends)
        # the det message goes out before the frame is counted: wait for the count
        wait_until(lambda: 'nanoscout_frames_processed_total{source="px"} 2.0' in d.scrape(),
                   timeout=10, what="the frames counted")
        yield d
    finally:
        d.stop()
        if d.pump is not None:
            d.pump.join(30)


def test_every_queried_series_exists_with_its_type_and_labels(daemon: DaemonProc) -> None:
    exposed = exposition(daemon.scrape())
    policies = set(get_args(Policy))
    problems = []
    for where, expr in queries():
        names = [name for name, _ in _SELECTOR.findall(expr)]
        for name, braces in _SELECTOR.findall(expr):
            series = exposed.get(name)
            if series is None:
                problems.append(f"{where}: {name} is not exposed")
                continue
            for key, op, value in _MATCHER.findall(braces or ""):
                if key in _TARGET_LABELS:
                    continue
                values = series.labels.get(key)
                if values is None:
                    problems.append(f"{where}: {name} has no label {key!r}")
                elif op == "=" and value not in values and not (key == "policy"
                                                                and value in policies):
                    problems.append(f"{where}: {name}{{{key}={value!r}}} matches nothing "
                                    f"(values: {sorted(values)})")
                elif op == "=~" and not any(re.fullmatch(value, v) for v in values):
                    problems.append(f"{where}: {name}{{{key}=~{value!r}}} matches nothing")
        for group in _GROUPING.findall(expr):
            for label in (x.strip() for x in group.split(",")):
                if label and label not in _TARGET_LABELS | {"le"} and not any(
                        label in exposed[n].labels for n in names if n in exposed):
                    problems.append(f"{where}: grouped by {label!r}, a label none of "
                                    f"{names} has")
        for name in _RATE.findall(expr):
            kind = exposed[name].type if name in exposed else None
            if kind not in ("counter", "histogram") or (kind == "histogram"
                                                        and not name.endswith("_bucket")
                                                        and not name.endswith(("_sum", "_count"))):
                problems.append(f"{where}: rate/increase of {name}, a {kind}")
        if _QUANTILE.search(expr):
            buckets = [n for n in names if n.endswith("_bucket")]
            if not buckets or not re.search(r"\bby\s*\([^)]*\ble\b", expr):
                problems.append(f"{where}: histogram_quantile needs _bucket series by le")
    assert not problems, "\n".join(problems)


def _finite_bounds(text: str, name: str, **labels: str) -> list[float]:
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return sorted(float(s.labels["le"]) for s in family.samples
                          if s.name == name + "_bucket" and s.labels["le"] != "+Inf"
                          and all(s.labels.get(k) == v for k, v in labels.items()))
    raise AssertionError(f"{name} is not exposed")


def test_stage_histogram_resolves_as_far_as_the_latency_it_is_part_of(daemon: DaemonProc) -> None:
    """queue_wait and engine are parts of the acquisition-to-result latency: a backlog of a
    lossless daemon or a large frame on the CPU puts them in seconds. Beyond the largest finite
    bucket, histogram_quantile answers that bucket's bound, so the dashboard's "Time per
    pipeline stage (p50)" once stayed flat at 2 s while frames waited 3-4 s in the queue."""
    text = daemon.scrape()
    latency = _finite_bounds(text, "nanoscout_latency_seconds")
    for stage in ("queue_wait", "engine"):
        bounds = _finite_bounds(text, "nanoscout_stage_seconds", stage=stage)
        assert bounds, stage
        assert bounds[-1] >= latency[-1], (stage, bounds, latency)
        assert bounds[0] <= 0.001, (stage, bounds)  # and still resolves the sub-ms stages


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _query(base: str, expr: str) -> list | None:
    try:
        with urllib.request.urlopen(base + "/api/v1/query?query=" + urllib.parse.quote(expr),
                                    timeout=5) as r:
            answer = json.loads(r.read().decode())
    except OSError:
        return None
    return answer["data"]["result"] if answer.get("status") == "success" else None


@pytest.mark.skipif(PROMETHEUS is None, reason="Prometheus is not installed (apt-get install prometheus)")
def test_every_dashboard_query_returns_data_for_a_running_daemon(daemon: DaemonProc,
                                                                 tmp_path: Path) -> None:
    """A real Prometheus scrapes the daemon every second; each dashboard panel's query
    ($instance = all) and each recording rule answers at least one series."""
    assert PROMETHEUS is not None and daemon.metrics is not None
    target = urllib.parse.urlparse(daemon.metrics).netloc
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {DEPLOY / 'nanoscout-rules.yml'}\n"
        "scrape_configs:\n  - job_name: nanoscout\n    static_configs:\n"
        f"      - targets: ['{target}']\n", encoding="utf-8")
    port = _free_port()
    prom = subprocess.Popen(
        [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        exprs = [(w, e.replace("$instance", ".*")) for w, e in queries()
                 if w.startswith("panel ")]
        rules = yaml.safe_load((DEPLOY / "nanoscout-rules.yml").read_text(encoding="utf-8"))
        exprs += [(f"recorded {r['record']}", r["record"]) for g in rules["groups"]
                  for r in g["rules"] if "record" in r]
        pending = dict(exprs)

        def answered() -> bool:
            for where, expr in list(pending.items()):
                if _query(base, expr):
                    del pending[where]
            return not pending

        try:  # rate() over [1m] needs two scrapes; the recording rules one evaluation
            wait_until(answered, timeout=90, interval=0.5, what="every query answered")
        except TimeoutError:
            pytest.fail("no data for:\n" + "\n".join(f"{w}: {e}" for w, e in pending.items()))
    finally:
        prom.terminate()
        prom.wait(30)
