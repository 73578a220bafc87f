"""Start-up checks of a :class:`~nanoscout.daemon.config.ServeConfig` that need this machine
but no model: run before any model loads (an engine per model, and on a first start on a GPU
a TensorRT plan build of minutes: deploy/README.md), so that a configuration that cannot work
is refused at once, in one line naming the setting and the file.

:func:`check_startup` finds, all in one pass:

- a fixed TCP port that cannot be bound (``input`` / ``output`` / ``query`` endpoints,
  ``[metrics] port``): in use by another program (a second daemon on the same microscope PC),
  given to two settings, or a host that is not this machine's. Each is bound for a moment with
  ``SO_REUSEADDR``, as ZeroMQ and the metrics server bind, and released; port 0 (any free
  port) and other transports are left to the real bind;
- an ``ipc://`` endpoint whose socket file another program listens on: ZeroMQ's bind takes
  the path over without a word (the file is replaced), and the other daemon's clients' frames
  then reach this one; a file nobody listens on (left by a killed daemon) is fine;
- a model file or its model card missing or unreadable (``[engine] model``,
  ``modality_models``, ``[classify] model`` / ``lens`` when used): the cards are read without
  hashing the ONNX file;
- a tile side that is no multiple of a detector's stride (its card's
  ``input.stride_multiple``; ``tile_px > 2 x tile_margin_px`` is the configuration's own check);
- ``[engine] min_confidence`` for a detector named without a ``score_calibration``; an alert
  rule that reads what ``[classify]`` switches off, or names a class the classifier's card does
  not know;
- a folder the daemon writes (``[review] directory``, the ``--ready-file``'s folder) that
  cannot be created or written (tried with a temporary folder, removed at once).

The problems found go into one :class:`~nanoscout.wire.errors.StartupError` (``nanoscout
serve`` exits 78, ``EX_CONFIG``). A port taken between this check and the real bind is still refused
there (``cannot bind ...``), after the models loaded.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
from pathlib import Path

from nanoscout.analysis.alerts import check_class_labels, check_rule_inputs, parse_rules
from nanoscout.analysis.modelcard import ModelCard
from nanoscout.daemon.config import ServeConfig
from nanoscout.wire.errors import ConfigError, ModelCardError, StartupError

__all__ = ["check_startup"]


def _tcp_address(endpoint: str) -> tuple[str, int] | None:
    """(host, port) of a ``tcp://HOST:PORT`` endpoint with a fixed port; None for port 0 / ``*``
    and other transports (ZeroMQ's own bind reports those)."""
    scheme, _, address = endpoint.partition("://")
    if scheme != "tcp":
        return None
    host, _, port = address.rpartition(":")
    host = host.rsplit(";", 1)[-1].strip("[]")
    if not port.isdigit() or int(port) == 0:
        return None
    return ("0.0.0.0" if host == "*" else host), int(port)


def _probe(host: str, port: int) -> tuple[socket.socket | None, str | None]:
    """Bind ``host:port`` as a listener would (``SO_REUSEADDR``); returns (the bound socket,
    to be closed by the caller, None) or (None, why it cannot be bound). A host that does not
    resolve (a ZeroMQ interface name) is left to the real bind: (None, None)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return None, None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        return None, exc.strerror or str(exc)
    return sock, None


def _ipc_in_use(endpoint: str) -> str | None:
    """Why the ``ipc://`` endpoint's socket file is taken (a listener answers a connection on
    it), or None: another transport, no file, or a file nobody listens on."""
    scheme, _, path = endpoint.partition("://")
    if scheme != "ipc" or not path or path.startswith("@") or not Path(path).exists():
        return None  # "@name": Linux's abstract namespace, which ZeroMQ's bind refuses itself
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return None  # refused (stale), or not a socket: left to the real bind
    return "another program listens on it (another nanoscout daemon on this machine?)"


def _overlap(a: str, b: str) -> bool:
    """True when listeners on hosts ``a`` and ``b`` would take the same port."""
    return a == b or {a, b} & {"0.0.0.0", "::", ""} != set()


def _ports(config: ServeConfig) -> list[str]:
    """Problems with the fixed TCP ports the daemon will bind (each bound for a moment, all at
    once, so that two settings giving the same port are found too)."""
    wanted: list[tuple[str, str, tuple[str, int] | None]] = [
        ("input.endpoint", config.input.endpoint, _tcp_address(config.input.endpoint)),
        ("output.endpoint", config.output.endpoint, _tcp_address(config.output.endpoint))]
    if config.query.enabled:
        wanted.append(("query.endpoint", config.query.endpoint,
                       _tcp_address(config.query.endpoint)))
    m = config.metrics
    if m.enabled and m.port:
        wanted.append(("metrics.port", f"{m.host}:{m.port}", (m.host, m.port)))
    problems = [f"{key} {value}: {why}" for key, value, _ in wanted
                if (why := _ipc_in_use(value)) is not None]
    held: list[tuple[str, int, str]] = []  # (host, port, key): sockets bound for a moment
    with contextlib.ExitStack() as stack:
        for key, value, address in wanted:
            if address is None:
                continue
            host, port = address
            # two probes with SO_REUSEADDR may share a port (neither listens): compare them
            other = next((k for h, p, k in held if p == port and _overlap(h, host)), None)
            if other is not None:
                problems.append(f"{key} {value}: port {port} is {other}'s too")
                continue
            sock, why = _probe(host, port)
            if sock is not None:
                stack.callback(sock.close)
                held.append((host, port, key))
            elif why is not None:
                problems.append(f"{key} {value}: cannot bind port {address[1]} ({why}; another "
                                "nanoscout daemon on this machine?)")
    return problems


def _models(config: ServeConfig) -> list[str]:
    """Problems with the model files and cards ``serve`` will load (no ONNX file is read)."""
    eng, cc = config.engine, config.classify
    files: list[tuple[str, Path, bool]] = [("engine.model", eng.model_path(), True)]
    files += [(f"engine.modality_models.{m}", p, True)
              for m, p in eng.modality_model_paths().items()]
    if cc.enabled:
        files.append(("classify.model", cc.model_path(), False))
        if cc.lens_enabled:
            files.append(("classify.lens", cc.lens_path(), False))
    problems = []
    classes: tuple[str, ...] | None = None
    for key, onnx, detector in files:
        if not onnx.is_file():
            problems.append(f"{key} {onnx}: no such file")
            continue
        try:
            card = ModelCard.load(onnx.with_suffix(".json"), verify_sha256=False)
        except ModelCardError as exc:
            problems.append(f"{key} {onnx}: {exc}")
            continue
        if key == "classify.model":
            classes = tuple(card.classes or ())
        if not detector:
            continue
        stride = card.input.stride_multiple
        if eng.tile_px is not None and stride and eng.tile_px % stride:
            problems.append(f"engine.tile_px {eng.tile_px} must be a multiple of {onnx.name}'s "
                            f"network stride {stride}")
        # the shipped STEM detector added without being asked for keeps its raw cut (a
        # warning at load: nanoscout.daemon.app.build_detector); a model named gets the error
        added = key.startswith("engine.modality_models.") and eng.modality_models is None
        if eng.min_confidence is not None and card.score_calibration is None and not added:
            problems.append(f"engine.min_confidence {eng.min_confidence}: {key} {onnx} has no "
                            "score_calibration in its model card, so its scores are not "
                            "probabilities (nanoscout models calibrate; or cut on the raw "
                            "score: engine.score_cut)")
    problems += _rules(config, classes)
    return problems


def _rules(config: ServeConfig, classes: tuple[str, ...] | None) -> list[str]:
    """Problems with the alert rules that the model cards show: a rule reading what is switched
    off, a class label the classifier's card (``classes``; None: not read) does not know."""
    rules = parse_rules(config.alerts)  # valid: the configuration checked them
    cc = config.classify
    problems = []
    try:
        check_rule_inputs(rules, classifier=cc.enabled, lens=cc.enabled and cc.lens_enabled)
        if classes is not None:
            check_class_labels(rules, classes)
    except ConfigError as exc:
        problems.append(f"alerts: {exc}")
    return problems


def _writable_folder(key: str, folder: Path) -> str | None:
    """Why ``folder`` cannot take new files, or None. A temporary folder is made (and removed)
    in it, or where it does not exist yet in its nearest existing parent, as the daemon will
    create it on its first write: permission bits alone do not say it (root passes them; a
    read-only file system). Nothing is left behind."""
    folder = folder.expanduser()
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{key} {folder}: cannot write there ({probe} is not a folder)"
    try:
        tempfile.TemporaryDirectory(dir=probe).cleanup()
    except OSError as exc:
        return f"{key} {folder}: cannot write there ({exc.strerror or exc})"
    return None


def check_startup(config: ServeConfig, *, config_file: str | Path | None = None,
                  ready_file: Path | None = None) -> None:
    """Raise :class:`StartupError` naming every setting of ``config`` (read from
    ``config_file``) that cannot work on this machine (see the module); takes milliseconds and
    loads no model. ``ready_file``: the ``--ready-file`` ``serve`` will write."""
    problems = _ports(config) + _models(config)
    if config.review.enabled and config.review.frames > 0:
        problems.append(_writable_folder("review.directory", config.review.directory) or "")
    if ready_file is not None:
        problems.append(_writable_folder("--ready-file", ready_file.parent) or "")
    problems = [p for p in problems if p]
    if problems:
        where = f" in {config_file}" if config_file else ""
        raise StartupError(f"configuration{where} cannot work: " + "; ".join(problems))
