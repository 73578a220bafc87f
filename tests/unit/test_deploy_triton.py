"""deploy/triton/ parses and starts what exists: the daemons' commands and configurations are
the CLI's and the config loader's, and every ``tritonserver`` option is one the real server
binary (the nvidia-pytriton wheel's, where ``.venv-triton`` exists) lists in its ``--help``."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from nanoscout.daemon.config import load_config
from tests.conftest import REPO
from tests.triton_server import find_dist
from tests.unit.test_deploy import cli_accepts

yaml = pytest.importorskip("yaml", reason="pyyaml is needed to parse the compose/k8s files")

TRITON = REPO / "deploy" / "triton"


def _compose() -> dict:
    return yaml.safe_load((TRITON / "compose.yaml").read_text(encoding="utf-8"))


def _k8s() -> list[dict]:
    return list(yaml.safe_load_all((TRITON / "kubernetes.yaml").read_text(encoding="utf-8")))


def _server_args() -> list[list[str]]:
    """The tritonserver command lines of compose.yaml and kubernetes.yaml."""
    cmds = [_compose()["services"]["triton"]["command"]]
    for doc in _k8s():
        if doc["kind"] == "Deployment":
            cmds += [c["args"] for c in doc["spec"]["template"]["spec"]["containers"]]
    return cmds


def test_compose_daemons_run_valid_commands_on_their_configs() -> None:
    services = _compose()["services"]
    daemons = {k: v for k, v in services.items() if k != "triton"}
    ports = set()
    for svc in daemons.values():
        cli_accepts(svc["command"])
        config_path = svc["command"][svc["command"].index("--config") + 1]
        local = TRITON / Path(config_path).name
        assert any(v.startswith(f"./{local.name}:{config_path}") for v in svc["volumes"])
        config = load_config(local)
        assert config.engine.backend == "triton" and config.engine.triton.fallback
        assert config.engine.triton.url == "127.0.0.1:8001"  # host network: the server's port
        assert svc["ipc"] == services["triton"]["ipc"] == "host"  # shared memory works
        assert svc["depends_on"]["triton"]["condition"] == "service_healthy"
        ports |= {config.input.endpoint, config.output.endpoint, config.query.endpoint,
                  config.metrics.port}
    assert len(ports) == 4 * len(daemons), "two daemons on one host must not share a port"


def test_kubernetes_gives_triton_a_gpu_and_a_grpc_service() -> None:
    docs = {d["kind"]: d for d in _k8s()}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["port"] for p in docs["Service"]["spec"]["ports"]}
    assert ports["grpc"] == 8001
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]


def test_readme_config_snippets_load(tmp_path: Path) -> None:
    text = (TRITON / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", text, re.DOTALL)
    assert blocks
    for i, block in enumerate(blocks):
        path = tmp_path / f"block-{i}.toml"
        path.write_text(block, encoding="utf-8")
        assert load_config(path).engine.backend == "triton"


def test_client_image_starts_a_valid_command() -> None:
    text = (TRITON / "Containerfile.client").read_text(encoding="utf-8")
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    assert entry == ["nanoscout"]
    cli_accepts(cmd)
    installs = " ".join(ln for ln in text.splitlines() if "pip install" in ln)
    assert "tritonclient[grpc]" in installs and "torch" not in installs


def test_tritonserver_knows_every_option() -> None:
    dist = find_dist()
    if isinstance(dist, str):
        pytest.skip(dist)
    from tests.triton_server import server_env

    helptext = subprocess.run([str(dist.server / "bin" / "tritonserver"), "--help"],
                              capture_output=True, text=True, timeout=60, env=server_env(dist))
    known = set(re.findall(r"--[a-z][a-z0-9-]+", helptext.stdout + helptext.stderr))
    for cmd in _server_args():
        assert cmd[0] == "tritonserver"
        for arg in cmd[1:]:
            assert arg.split("=")[0] in known, arg
