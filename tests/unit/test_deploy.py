"""The deployment files in deploy/ parse, and reference only what the code defines.

* the annotated TOML example loads with the daemon's own loader and documents every key;
* Prometheus config, rules and the Grafana dashboard use only metric names that
  src/nanoscout/daemon/metrics.py registers (recording-rule names must be recorded somewhere);
* systemd units and container files start the CLI with options its parser accepts;
* ``promtool`` (Debian package ``prometheus``) checks config, rules and the dashboard's PromQL
  where it is installed, and is skipped with a reason elsewhere.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from pydantic import BaseModel

from nanoscout.daemon.config import ServeConfig, load_config
from nanoscout.daemon.connections import CONNECTION_EVENTS
from nanoscout.daemon.hotswap import FAILURE_STEPS
from nanoscout.daemon.metrics import Metrics
from tests.conftest import REPO

yaml = pytest.importorskip("yaml", reason="pyyaml is needed to parse the Prometheus files")

DEPLOY = REPO / "deploy"
# a metric name not preceded by ':' or a word character, so that recording-rule names such as
# instance:nanoscout_latency_seconds:p99_5m are not mistaken for raw metric names
_METRIC_RE = re.compile(r"(?<![\w:])nanoscout_[A-Za-z0-9_]+")
_RECORDED_RE = re.compile(r"(?<![\w])[A-Za-z_][A-Za-z0-9_]*:[A-Za-z0-9_:]+")
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exposed_names() -> set[str]:
    """Every sample name a daemon's /metrics can show (from nanoscout.daemon.metrics.Metrics)."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        for suffix in _SUFFIXES[family.type]:
            names.add(family.name + suffix)
    return names


def undefined_metrics(expr: str, defined: set[str]) -> set[str]:
    """The ``nanoscout_*`` names in a PromQL expression that the daemon does not expose."""
    return {name for name in _METRIC_RE.findall(expr) if name not in defined}


def load_rules() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "nanoscout-rules.yml").read_text(encoding="utf-8"))


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana-dashboard.json").read_text(encoding="utf-8"))


def dashboard_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query target in the dashboard, rows included."""
    out = []
    for panel in dash["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            for target in sub.get("targets", []):
                out.append((sub["title"], target["expr"]))
    return out


def unit_file(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Parse a systemd unit into section -> [(key, value)] (keys may repeat, as systemd allows)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not key=value"
        current.append((key.strip(), value.strip()))
    return sections


def exec_argv(unit: dict[str, list[tuple[str, str]]]) -> list[str]:
    """ExecStart of a unit as argv, ${VAR} replaced by the unit's Environment= default."""
    env: dict[str, str] = {}
    for key, value in unit["Service"]:
        if key == "Environment":
            for item in shlex.split(value):
                name, _, val = item.partition("=")
                env[name] = val
    (cmd,) = [v for k, v in unit["Service"] if k == "ExecStart"]
    cmd = cmd.replace("%i", "")
    expanded = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], cmd)
    return shlex.split(expanded)


def cli_accepts(argv: list[str]) -> None:
    """Fail the test unless the nanoscout CLI parser accepts ``argv`` (a subcommand and options)."""
    import typer

    from nanoscout.cli.main import check_args

    try:
        check_args(argv)
    except typer.TyperException as exc:  # a bad parameter or an unknown option
        pytest.fail(f"nanoscout rejects {shlex.join(argv)}: {exc}")


# ---------------------------------------------------------------------------------------------
# daemon configuration


def test_example_config_loads_with_rules_of_every_kind() -> None:
    config = load_config(DEPLOY / "nanoscout.example.toml")
    kinds = {rule["kind"] for rule in config.alerts}
    assert kinds == {"particle", "count", "d50_drift"}
    assert {rule["severity"] for rule in config.alerts} >= {"warning", "critical"}


def test_example_config_shows_the_defaults() -> None:
    """The file says "the value shown is the default": hold it to that (alerts are examples)."""
    example = load_config(DEPLOY / "nanoscout.example.toml").model_dump(exclude={"alerts"})
    assert example == ServeConfig().model_dump(exclude={"alerts"})


def test_example_config_documents_every_key() -> None:
    text = (DEPLOY / "nanoscout.example.toml").read_text(encoding="utf-8")
    missing = []
    for section, info in ServeConfig.model_fields.items():
        if section == "alerts":
            continue
        assert f"[{section}]" in text, f"section [{section}] missing"
        model = info.annotation
        for key, field in model.model_fields.items():  # type: ignore[union-attr]
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):  # a nested [a.b] table
                assert f"[{section}.{key}]" in text, f"section [{section}.{key}] missing"
                missing += [f"{section}.{key}.{k}" for k in sub.model_fields
                            if not re.search(rf"^#?\s*{k}\s*=", text, re.MULTILINE)]
            # set, or shown commented out as an example
            elif not re.search(rf"^#?\s*{key}\s*=", text, re.MULTILINE):
                missing.append(f"{section}.{key}")
    assert not missing, f"keys of src/nanoscout/daemon/config.py not documented in the example: {missing}"


def test_readme_config_snippets_load(tmp_path: Path) -> None:
    """Every TOML block in deploy/README.md is a valid daemon configuration."""
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", text, re.DOTALL)
    assert blocks, "deploy/README.md has no TOML example"
    for i, block in enumerate(blocks):
        path = tmp_path / f"readme-{i}.toml"
        path.write_text(block, encoding="utf-8")
        load_config(path)


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("sed") is None,
                    reason="the recipe is a bash loop over sed")
def test_readme_multi_gpu_recipe_gives_each_daemon_its_own_ports(tmp_path: Path) -> None:
    """The "Several GPUs on one node" loop of deploy/README.md, run as written (into tmp_path
    instead of /etc/nanoscout), gives each daemon its own four ports: a port two daemons
    share stops the second at start ("cannot bind ...: Address already in use")."""
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    found = re.search(r"for n in 0 1; do\n\s*(sed .*?/etc/nanoscout/nanoscout\$n\.toml)\n", text,
                      re.DOTALL)
    assert found, "deploy/README.md has no multi-GPU sed loop"
    sed = found.group(1).replace("/etc/nanoscout/", '"$OUT"/')
    subprocess.run(["bash", "-c", f"set -e; for n in 0 1; do {sed}; done"], cwd=REPO, check=True,
                   env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"})
    ports: dict[str, str] = {}
    for n in (0, 1):
        cfg = load_config(tmp_path / f"nanoscout{n}.toml")
        for what, where in (("input", cfg.input.endpoint), ("output", cfg.output.endpoint),
                            ("query", cfg.query.endpoint), ("metrics", f":{cfg.metrics.port}")):
            port = where.rsplit(":", 1)[1]
            assert port not in ports, f"daemon {n}'s {what} port {port} is {ports[port]}'s too"
            ports[port] = f"daemon {n}'s {what}"
    assert len(ports) == 8


# ---------------------------------------------------------------------------------------------
# Prometheus


def test_metric_name_check_catches_unknown_names() -> None:
    defined = exposed_names()
    assert "nanoscout_latency_seconds_bucket" in defined
    assert "nanoscout_frames_processed_total" in defined
    assert "nanoscout_engine_info" in defined
    expr = "rate(nanoscout_frames_procesed_total[1m]) / instance:nanoscout_x:rate1m"
    assert undefined_metrics(expr, defined) == {"nanoscout_frames_procesed_total"}


def test_scrape_config_targets_the_daemon_metrics_port() -> None:
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    for rule_file in cfg["rule_files"]:
        assert (DEPLOY / rule_file).is_file(), rule_file
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "nanoscout"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    default_port = ServeConfig().metrics.port
    assert any(t.endswith(f":{default_port}") for t in targets), targets


def test_rules_use_only_defined_metrics() -> None:
    defined = exposed_names()
    groups = load_rules()["groups"]
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    assert len(alerts) >= 5
    for group in groups:
        for rule in group["rules"]:
            expr = rule["expr"]
            name = rule.get("record") or rule.get("alert")
            assert not undefined_metrics(expr, defined), f"{name}: {undefined_metrics(expr, defined)}"
            unknown_recorded = set(_RECORDED_RE.findall(expr)) - recorded
            assert not unknown_recorded, f"{name}: recording rules not defined: {unknown_recorded}"


def test_alerts_have_severity_and_summary() -> None:
    for group in load_rules()["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
                assert rule["annotations"]["summary"], rule["alert"]


# ---------------------------------------------------------------------------------------------
# Grafana


def test_dashboard_queries_use_only_defined_metrics() -> None:
    dash = dashboard()
    defined = exposed_names()
    exprs = dashboard_exprs(dash)
    assert len(exprs) >= 10
    for title, expr in exprs:
        assert not undefined_metrics(expr, defined), f"panel {title!r}: {expr}"
        assert "nanoscout_" in expr or expr.startswith("up"), f"panel {title!r} queries {expr}"
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            assert not undefined_metrics(q, defined), f"variable {var['name']}: {q}"


def test_dashboard_layout_is_valid() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, f"panel {p['title']!r} exceeds 24 columns"
    variables = {v["name"] for v in dash["templating"]["list"]}
    for title, expr in dashboard_exprs(dash):
        for used in re.findall(r"\$(\w+)", expr):
            assert used in variables, f"panel {title!r} uses undefined variable ${used}"


#: a PromQL aggregation operator and the ``by (...)`` / ``without (...)`` clause before its
#: operand, if any (``max_over_time`` or ``..._sum`` are not matched: no word boundary)
_AGGREGATION_RE = re.compile(
    r"\b(sum|avg|min|max|count|group|stddev|stdvar|topk|bottomk|quantile|count_values)\s*"
    r"(?:(by|without)\s*\(([^()]*)\)\s*)?\(")


def aggregations(expr: str) -> list[tuple[str, str | None, set[str]]]:
    """(operator, ``by`` / ``without`` / None, labels) of every aggregation in ``expr``; a
    clause written after the operand (``sum(x) by (instance)``) is found too."""
    out = []
    for m in _AGGREGATION_RE.finditer(expr):
        mode, labels = m.group(2), m.group(3)
        if mode is None:  # the clause may follow the operand's closing parenthesis
            depth, i = 1, m.end()
            while depth and i < len(expr):
                depth += {"(": 1, ")": -1}.get(expr[i], 0)
                i += 1
            after = re.match(r"\s*(by|without)\s*\(([^()]*)\)", expr[i:])
            if after:
                mode, labels = after.group(1), after.group(2)
        out.append((m.group(1), mode,
                    {s.strip() for s in (labels or "").split(",") if s.strip()}))
    return out


def test_aggregations_finds_every_form() -> None:
    assert aggregations('histogram_quantile(0.5, sum by (stage, le) (rate(x_bucket[5m])))') == [
        ("sum", "by", {"stage", "le"})]
    assert aggregations("sum(rate(x[1m])) by (instance) + max without (source) (y)") == [
        ("sum", "by", {"instance"}), ("max", "without", {"source"})]
    assert aggregations("avg(x)") == [("avg", None, set())]
    assert aggregations("max_over_time(x_sum[5m])") == []


def test_dashboard_aggregates_per_daemon() -> None:
    """A facility's Prometheus scrapes many daemons: a panel that sums (or averages, takes the
    maximum or a quantile) over ``instance`` shows one meaningless total. Every aggregation
    keeps ``instance``. And every query selects the daemons of ``$instance`` (several at once),
    so each of its series may come from any daemon: its legend names it, as the other panels
    do (the class probability panel and the alert thresholds table once read ``{{label}}
    {{source}}`` and ``{{name}}``: one entry per daemon, all alike). A table that sets no
    legend names the daemon in its ``instance`` column, which it must not hide."""
    dash = dashboard()
    (var,) = [v for v in dash["templating"]["list"] if v["name"] == "instance"]
    assert var["multi"] and var["includeAll"], var
    checked = legends = 0
    for panel in dash["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            hidden = {name for t in sub.get("transformations", []) if t["id"] == "organize"
                      for name, off in t["options"].get("excludeByName", {}).items() if off}
            for target in sub.get("targets", []):
                expr, where = target["expr"], f"panel {sub['title']!r}"
                assert 'instance=~"$instance"' in expr, f"{where}: {expr} ignores $instance"
                found = aggregations(expr)
                for op, mode, labels in found:
                    keeps = "instance" in labels if mode == "by" else (
                        mode == "without" and "instance" not in labels)
                    clause = f"{op} {mode or ''} ({', '.join(sorted(labels))})"
                    assert keeps, f"{where}: {clause} adds up every daemon: group by instance in {expr}"
                checked += bool(found)
                legend = target.get("legendFormat", "")
                if target.get("format") == "table":
                    assert "instance" not in hidden, f"{where}: its table hides the daemon column"
                    if not legend:
                        continue
                legends += 1
                assert "{{instance}}" in legend, (
                    f"{where}: legend {legend!r} of {expr} does not name the daemon")
    assert checked >= 15 and legends >= 30

# ---------------------------------------------------------------------------------------------
# promtool (only where installed)

_PROMTOOL = shutil.which("promtool") or ""
needs_promtool = pytest.mark.skipif(
    not _PROMTOOL, reason="promtool not installed (Debian/Ubuntu: apt install prometheus)"
)


@needs_promtool
def test_promtool_accepts_config_and_rules() -> None:
    r = subprocess.run([_PROMTOOL, "check", "config", "prometheus.yml"], cwd=DEPLOY,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([_PROMTOOL, "check", "rules", "nanoscout-rules.yml"], cwd=DEPLOY,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_accepts_dashboard_queries(tmp_path: Path) -> None:
    """Each dashboard query, as a recording rule, must be valid PromQL."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$instance", ".*")}
        for i, (_title, expr) in enumerate(dashboard_exprs(dashboard()))
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([_PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# systemd units and containers


@pytest.mark.parametrize("name, subcommand", [("nanoscout.service", "serve"),
                                               ("nanoscout-simulator.service", "simulate"),
                                               ("nanoscout-dashboard.service", "dashboard"),
                                               ("nanoscout-recorder.service", "record")])
def test_systemd_unit_runs_a_valid_cli_command(name: str, subcommand: str) -> None:
    unit = unit_file(DEPLOY / name)
    assert {"Unit", "Service", "Install"} <= set(unit)
    argv = exec_argv(unit)
    assert Path(argv[0]).name == "nanoscout" and argv[1] == subcommand
    cli_accepts(argv[1:])


def test_daemon_unit_outlasts_the_lossless_drain() -> None:
    """systemd must not SIGKILL a lossless daemon that is still finishing accepted frames."""
    service = dict(unit_file(DEPLOY / "nanoscout.service")["Service"])
    stop_s = float(service["TimeoutStopSec"].rstrip("s"))
    assert stop_s > 120  # nanoscout.daemon.app.serve waits up to 120 s for the worker
    assert service.get("KillSignal", "SIGTERM") in ("SIGTERM", "SIGINT")


def _containerfile(name: str) -> tuple[str, list[str], list[str]]:
    text = (DEPLOY / name).read_text(encoding="utf-8")
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    return text, entry, cmd


@pytest.mark.parametrize("name", ["Containerfile", "Containerfile.gpu"])
def test_container_starts_a_valid_cli_command(name: str) -> None:
    _text, entry, cmd = _containerfile(name)
    assert entry == ["nanoscout"]
    cli_accepts(cmd)


def test_containers_install_exactly_one_onnxruntime_flavour() -> None:
    cpu, _, _ = _containerfile("Containerfile")
    gpu, _, _ = _containerfile("Containerfile.gpu")
    lock = (DEPLOY / "requirements-cpu.lock").read_text(encoding="utf-8")
    # the CPU image installs the lock, which holds the plain CPU wheel and nothing of torch
    assert "requirements-cpu.lock" in cpu
    assert re.search(r"^onnxruntime==", lock, re.MULTILINE)
    assert not re.search(r"^(onnxruntime-gpu|torch)==", lock, re.MULTILINE)
    gpu_installs = " ".join(ln for ln in gpu.splitlines()
                            if "pip install" in ln or ln.strip().startswith('"onnxruntime'))
    assert "onnxruntime-gpu" in gpu_installs
    assert "[cpu" not in gpu_installs and not re.search(r"onnxruntime(?!-gpu)[=<>\[\" ]", gpu_installs)
    assert "grep -v '^onnxruntime=='" in gpu  # the lock's CPU wheel is kept out of its constraints
    assert "torch" not in gpu_installs


def _requirement_names(specs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def test_cpu_image_builds_offline_from_the_pinned_lock() -> None:
    """Every package of the CPU image is pinned (==) with sha256 hashes, every dependency of
    pyproject.toml (and the cpu extra) is in the lock, and the image installs with no index."""
    import tomllib

    text, _, _ = _containerfile("Containerfile")
    installs = [ln for ln in text.splitlines() if "pip install" in ln]
    assert installs and all("--no-index" in ln for ln in installs), installs
    assert any("--require-hashes" in ln for ln in installs)
    assert "apt-get" not in text  # no network for system packages either
    lock = (DEPLOY / "requirements-cpu.lock").read_text(encoding="utf-8")
    pins: dict[str, str] = {}
    for block in re.split(r"\n(?=\S)", lock):
        head = block.splitlines()[0]
        if head.startswith("#") or not head.strip():
            continue
        m = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", head)
        assert m, f"not pinned: {head!r}"
        assert "--hash=sha256:" in block, f"no hash for {head!r}"
        pins[m.group(1).lower()] = m.group(2)
    meta = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = _requirement_names(meta["dependencies"] + meta["optional-dependencies"]["cpu"])
    assert wanted <= set(pins), f"not in the lock: {sorted(wanted - set(pins))}"
    for script in ("wheelhouse.sh", "lock.sh"):
        body = (DEPLOY / script).read_text(encoding="utf-8")
        assert "requirements-cpu.lock" in body
    assert "--require-hashes" in (DEPLOY / "wheelhouse.sh").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["Containerfile", "Containerfile.gpu"])
def test_container_health_check_follows_the_daemon_not_a_fixed_port(name: str) -> None:
    text, _, _ = _containerfile(name)
    (check,) = re.findall(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.MULTILINE)
    argv = json.loads(check)
    assert argv[:2] == ["nanoscout", "health"] and "9108" not in check
    cli_accepts(argv[1:])
    assert "NANOSCOUT_READY_FILE=" in text  # serve writes it, health reads it


def test_dashboard_shows_sizes_and_the_classifier() -> None:
    exprs = " ".join(e for _, e in dashboard_exprs(dashboard()))
    for metric in ("nanoscout_ecd_d10", "nanoscout_ecd_d50", "nanoscout_ecd_d90",
                   "nanoscout_window_particles", "nanoscout_particles_last_frame",
                   "nanoscout_class_probability", "nanoscout_novelty",
                   "nanoscout_classify_failures_total", "nanoscout_alert_threshold"):
        assert metric in exprs, f"no Grafana panel shows {metric}"


def test_dashboard_and_rules_follow_the_model_and_the_review_frames() -> None:
    """Hot swaps (issue 18) show in Grafana and page on failure; so do refused frame saves."""
    exprs = " ".join(e for _, e in dashboard_exprs(dashboard()))
    for metric in ("nanoscout_model_generation", "nanoscout_model_swaps_total",
                   "nanoscout_model_swap_failures_total", "nanoscout_frames_saved_total",
                   "nanoscout_frame_save_failures_total"):
        assert metric in exprs, f"no Grafana panel shows {metric}"
    alerts = {r["alert"]: r for g in load_rules()["groups"] for r in g["rules"] if "alert" in r}
    assert "nanoscout_model_swap_failures_total" in alerts["NanoscoutModelSwapFailed"]["expr"]
    assert "nanoscout_model_generation" in alerts["NanoscoutModelChanged"]["expr"]
    assert "nanoscout_frame_save_failures_total" in alerts["NanoscoutFrameSavesFailing"]["expr"]
    text = generate_latest(Metrics().registry).decode()
    for action, steps in FAILURE_STEPS.items():  # increase() sees a first failure after start
        for step in steps:
            assert (f'nanoscout_model_swap_failures_total{{action="{action}",step="{step}"}} 0.0'
                    in text)


def test_dashboard_and_rules_show_refused_connections() -> None:
    """Connections refused at the handshake on any of the daemon's sockets (a CURVE key not
    authorised; on results and query also another server key) page, naming the socket and
    the keys folder, and show per daemon, socket and event. The series the rule reads exist
    at 0 from a socket's start (increase() sees the first refusal); the input's events are
    counted in its metric of protocol 1.12 too."""
    panels = [(title, expr) for title, expr in dashboard_exprs(dashboard())
              if "nanoscout_connections_total" in expr]
    assert panels, "no Grafana panel shows nanoscout_connections_total"
    for title, expr in panels:
        assert "by (instance, socket, event)" in expr, f"panel {title!r}: {expr}"
    alerts = {r["alert"]: r for g in load_rules()["groups"] for r in g["rules"] if "alert" in r}
    rule = alerts["NanoscoutConnectionsRefused"]
    assert 'nanoscout_connections_total{event="handshake_failed_auth"}' in rule["expr"]
    assert "by (instance, socket, event)" in rule["expr"]
    assert "{{ $labels.socket }}" in rule["annotations"]["summary"]
    assert "authorized_keys" in rule["annotations"]["description"]
    m = Metrics()
    count_results, count_input = m.count_connections("results"), m.count_connections("input")
    count_results("handshake_failed_auth")
    count_input("accepted")
    value = m.registry.get_sample_value
    assert value("nanoscout_connections_total",
                 {"socket": "results", "event": "handshake_failed_auth"}) == 1
    for event in ("handshake_aborted", "handshake_failed"):  # at 0: increase() sees the first
        assert value("nanoscout_connections_total", {"socket": "results", "event": event}) == 0
        assert value("nanoscout_input_connections_total", {"event": event}) == 0
    assert value("nanoscout_connections_total", {"socket": "results", "event": "accepted"}) == 0
    assert value("nanoscout_connections_total", {"socket": "input", "event": "accepted"}) == 1
    assert value("nanoscout_input_connections_total", {"event": "accepted"}) == 1
    assert value("nanoscout_input_connections_total", {"event": "handshake_failed_auth"}) == 0
    assert value("nanoscout_connections_total",
                 {"socket": "query", "event": "accepted"}) is None  # not served here


def test_clients_closing_in_their_handshake_do_not_page() -> None:
    """A connection closed or timed out during its handshake (``handshake_aborted``: short-lived
    subscribers and query clients, TCP probes) is no refusal: the refusal alert selects its
    events by name, never that one nor by a pattern that would match it, and its description
    and the Grafana panel's say so; the panel explains every event the daemon counts."""
    assert "handshake_aborted" in CONNECTION_EVENTS
    alerts = {r["alert"]: r for g in load_rules()["groups"] for r in g["rules"] if "alert" in r}
    rule = alerts["NanoscoutConnectionsRefused"]
    events = set(re.findall(r'event\s*(=~|!=|!~|=)\s*"([^"]*)"', rule["expr"]))
    assert events == {("=", "handshake_failed_auth"), ("=", "handshake_failed")}, events
    assert "handshake_aborted" in rule["annotations"]["description"]
    panels = [sub for panel in dashboard()["panels"] for sub in [panel, *panel.get("panels", [])]
              if any("nanoscout_connections_total" in t["expr"] for t in sub.get("targets", []))]
    assert panels, "no Grafana panel shows nanoscout_connections_total"
    for panel in panels:
        described = set(re.findall(r"\b(?:accepted|disconnected|handshake_\w+)",
                                   panel["description"]))
        assert described >= set(CONNECTION_EVENTS), (panel["title"], described)
        assert "handshake_aborted does not" in panel["description"], panel["title"]


def test_alert_thresholds_come_from_the_deployment() -> None:
    """No fixed latency / backlog / skip threshold in the rules: each daemon exports its own
    (config [metrics] alert_*), recorded per instance with the config defaults as fallback."""
    rules = {r.get("alert") or r.get("record"): r["expr"]
             for g in load_rules()["groups"] for r in g["rules"]}
    cfg = ServeConfig().metrics
    for name, value in cfg.thresholds().items():
        rec = rules[f"instance:nanoscout_alert_threshold:{name}"]
        assert f'nanoscout_alert_threshold{{name="{name}"}}' in rec
        assert re.search(rf"\+ {value:g}\)", rec), f"{name}: fallback is not the default {value}"
    assert "instance:nanoscout_alert_threshold:latency_p99_seconds" in rules["NanoscoutLatencyHigh"]
    assert "0.3" not in rules["NanoscoutLatencyHigh"]
    assert "instance:nanoscout_alert_threshold:queue_depth" in rules["NanoscoutLosslessBacklog"]
    m = Metrics()
    m.set_thresholds(cfg.thresholds())
    m.observe_stats("cam", "nm", {"count": 40, "ecd": {"d10": 5.0, "d50": 8.0, "d90": None}})
    assert m.registry.get_sample_value("nanoscout_alert_threshold",
                                       {"name": "latency_p99_seconds"}) == 0.3
    assert m.registry.get_sample_value("nanoscout_ecd_d50", {"source": "cam", "units": "nm"}) == 8.0
    assert m.registry.get_sample_value("nanoscout_ecd_d90", {"source": "cam", "units": "nm"}) is None
    assert m.registry.get_sample_value("nanoscout_window_particles", {"source": "cam"}) == 40
