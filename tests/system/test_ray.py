"""``measure --ray`` on a local Ray cluster (``ray.init(num_cpus=2)``): a few hundred real and
synthetic frames give the same particle table as the single-process ``measure``, and the same
provenance (models with their sha256, configuration) in ``OUT/_run.json``; a worker killed
mid-run neither loses nor duplicates a file; a second run skips the files done and keeps the
first run's provenance."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nanoscout.analysis.modelcard import shipped_model_dir
from nanoscout.batch.offline import expand, measure_files
from nanoscout.batch.parts import part_paths
from nanoscout.batch.ray_measure import measure_on_ray
from nanoscout.clients.provenance import load_cards
from nanoscout.clients.runfile import read_run
from nanoscout.daemon.app import build_pipeline
from nanoscout.daemon.config import load_config
from nanoscout.sim.synthetic import Specimen, SpecimenConfig
from nanoscout.wire.tables import PARTICLE_TABLE_COLUMNS
from tests.system.conftest import nanoscout

pytestmark = pytest.mark.system

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'nanoscout[ray]')")
pa = pytest.importorskip("pyarrow")
import pyarrow.dataset as ds  # noqa: E402

_KEY = [("file", "ascending"), ("index", "ascending"), ("id", "ascending")]


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A local Ray with 2 CPU slots for the module (measure_on_ray uses it as it is)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _synthetic(folder: Path, n: int, seed: int) -> list[Path]:
    """``n`` calibrated 256² TEM frames (ImageJ TIFF, 0.5 nm/px) of one specimen."""
    import tifffile

    folder.mkdir(parents=True)
    cfg = replace(SpecimenConfig(), shape=(256, 256), dtype="uint16", pixel_size_nm=0.5)
    specimen = Specimen.generate(cfg, seed)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        img = specimen.acquire(rng, shift_px=(3.0 * k, -2.0 * k)).image
        path = folder / f"frame_{k:03d}.tif"
        tifffile.imwrite(path, img, imagej=True, resolution=(2000.0, 2000.0),
                         metadata={"unit": "micron"})
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def archive(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """About 270 frames: real EMPS crops, BF-TEM frames and instrument files (read where they
    are in ../shared/data), and synthetic frames in two folders."""
    root = tmp_path_factory.mktemp("archive")
    files = sorted((shared_data / "emps-train" / "images").iterdir())[:120]
    files += sorted((shared_data / "msa-tem-train" / "images").iterdir())
    files += expand([shared_data / "instrument-files" / "dm",
                     shared_data / "instrument-files" / "tiff"])
    files += _synthetic(root / "run-a", 70, 1) + _synthetic(root / "run-b", 50, 2)
    return files


@pytest.fixture(scope="module")
def single(archive: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run of the single-process ``measure`` (nanoscout.batch.offline) of the archive."""
    out = tmp_path_factory.mktemp("single") / "run.parquet"
    pipeline = build_pipeline(load_config(None, {}), offline=True)
    report = measure_files(archive, pipeline, out, log=lambda _: None,
                           model_cards=load_cards(shipped_model_dir()))
    pipeline.close()
    assert report.images > 250
    return out


@pytest.fixture(scope="module")
def reference(single: Path) -> Any:
    """The particle table of the single-process ``measure`` of the archive."""
    return read_run(single).to_arrow("particles")


def _provenance(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "_run.json").read_text(encoding="utf-8")))


#: compared with the run: every particle column but ``cluster`` (an online k-means over the
#: single process's stream, left unassigned by the parallel path)
_COLUMNS = ["file", "index", "units", *(c for c in PARTICLE_TABLE_COLUMNS if c != "cluster")]


def _particles(out: Path) -> Any:
    return ds.dataset(out / "particles", partitioning="hive").to_table()


def _assert_same(out: Path, reference: Any) -> None:
    got = _particles(out)
    assert set(got.column("cluster").to_pylist()) <= {255}
    got = pa.table({c: got.column(c).cast(reference.schema.field(c).type)
                    for c in _COLUMNS}).sort_by(_KEY)
    want = reference.select(_COLUMNS).sort_by(_KEY)
    assert got.num_rows == want.num_rows > 1000
    for c in _COLUMNS:
        a, b = got.column(c), want.column(c)
        if pa.types.is_floating(a.type):  # NaN: a length in nm of an uncalibrated image
            assert np.array_equal(a.to_numpy(), b.to_numpy(), equal_nan=True), c
        else:
            assert a.to_pylist() == b.to_pylist(), c


def _images(out: Path) -> Any:
    return ds.dataset(out / "images", partitioning="hive").to_table()


def test_measure_command_with_local_ray(archive: list[Path], tmp_path: Path) -> None:
    # first in the module: no Ray runs in this process yet, the command starts its own
    files = [str(p) for p in archive[-6:]]
    out = tmp_path / "out"
    proc = nanoscout("measure", *files, "--ray", "--workers", "1", "--out", str(out),
                     "--no-progress", stdout=subprocess.PIPE)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    assert "measured 6 files" in stdout and "on 1 Ray workers" in stdout
    assert _images(out).num_rows == 6
    # the driver's provenance: measure's record, the models with the sha256 of their cards
    prov = _provenance(out)
    assert prov["format"] == "nanoscout-parts/1" and prov["command"] == "nanoscout measure --ray"
    assert prov["files"] == files and prov["stopped_utc"] >= prov["started_utc"]
    assert prov["ray"]["workers"] == 1 and prov["ray"]["partitions"] == 1
    # the local Ray the command started, by the address Ray gave it
    assert prov["ray"]["started_here"] is True and prov["ray"]["address_requested"] is None
    assert re.fullmatch(r"[^:]+:\d+", prov["ray"]["address"]), prov["ray"]
    assert prov["config"]["engine"]["threads"] == 1 and prov["software"]["nanoscout"]
    assert prov["rows"] == {"particles": _particles(out).num_rows, "images": 6}
    assert prov["models"] and prov["failed"] == [] and prov["earlier_runs"] == []
    for entry in prov["model_provenance"]:
        assert re.fullmatch("[0-9a-f]{64}", entry["sha256"]), entry


def test_same_particles_as_single_process_partitioned_by_folder(
        cluster: None, archive: list[Path], single: Path, reference: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = measure_on_ray(archive, load_config(None, {}), out,
                            model_cards=load_cards(shipped_model_dir()))
    assert report.workers == 2 and not report.failed
    assert sorted(report.measured) == sorted(map(str, archive))
    _assert_same(out, reference)
    images = _images(out)
    folders = set(images.column("folder").to_pylist())
    assert {str(p.parent) for p in archive} == folders
    assert images.num_rows == report.images
    # the unreadable and uncalibrated are recorded, not lost: one row per file at least
    assert set(images.column("file").to_pylist()) == set(map(str, archive))
    assert images.filter(pa.compute.is_valid(images.column("top_class"))).num_rows > 250
    # the same provenance as measure's: every key, the models and their cards, what was
    # skipped and uncalibrated; plus the Ray facts
    prov, want = _provenance(out), _provenance(single)
    assert set(want) - {"format"} <= set(prov)
    for key in ("files", "models", "model_provenance", "engines", "uncalibrated"):
        assert prov[key] == want[key], key
    assert {f for f, _ in prov["skipped"]} == {f for f, _ in want["skipped"]}
    assert prov["rows"]["particles"] == want["rows"]["particles"] == report.particles
    assert prov["ray"]["workers"] == 2 and prov["ray"]["partitions"] == len(folders)


def test_killed_worker_loses_and_duplicates_nothing(cluster: None, archive: list[Path],
                                                    reference: Any, tmp_path: Path) -> None:
    files = archive[::4]  # every 4th: real and synthetic
    out = tmp_path / "out"
    killed: list[int] = []
    pids: list[int] = []
    by: dict[str, int] = {}

    def on_started(report: Any) -> None:
        pids.extend(report.worker_pids)

    def on_file(summary: dict[str, Any]) -> None:
        by[summary["file"]] = summary["pid"]
        if len(by) == 1:  # what a worker killed between writing and renaming a part leaves
            part = next((out / "particles").glob("folder=*/*.parquet"))
            (part.parent / f".tmp-{'0' * 32}-{part.name}").write_bytes(b"PAR1")
        if len(by) == 5 and not killed:  # the other worker is inside a file now
            victim = next(p for p in pids if p != summary["pid"])
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    report = measure_on_ray(files, load_config(None, {}), out, on_started=on_started,
                            on_file=on_file)
    assert killed and not report.failed
    assert sorted(report.measured) == sorted(map(str, files))  # each file once
    assert set(by.values()) - set(pids), "no file was measured by the restarted worker"
    images = _images(out)
    names = images.column("file").to_pylist()
    assert len(set(names)) == len(files)
    assert len(list((out / "images").rglob("*.parquet"))) == len(files)
    assert not list(out.rglob(".tmp-*"))
    want = reference.filter(pa.compute.is_in(reference.column("file"),
                                             pa.array([str(f) for f in files])))
    _assert_same(out, want)


def test_second_run_skips_files_done(cluster: None, archive: list[Path], reference: Any,
                                     tmp_path: Path) -> None:
    files = archive[1::6]
    out = tmp_path / "out"
    first = measure_on_ray(files[:20], load_config(None, {}), out)
    assert len(first.measured) == 20
    # what a crash leaves: a temporary part, and a particles part whose images part is missing
    particles_part, images_part = part_paths(out, files[25])
    particles_part.parent.mkdir(parents=True, exist_ok=True)
    particles_part.write_bytes(b"half a part")
    (particles_part.parent / ".tmp-123-x.parquet").write_bytes(b"")
    first_prov = _provenance(out)
    second = measure_on_ray(files, load_config(None, {}), out)
    assert sorted(second.skipped_done) == sorted(map(str, files[:20]))
    prov = _provenance(out)  # this run's record; the first run's (its models) kept
    assert prov["earlier_runs"] == [{k: v for k, v in first_prov.items() if k != "earlier_runs"}]
    assert prov["done_before"] == first_prov["files"] == [str(f) for f in files[:20]]
    assert prov["files"] == [str(f) for f in files] and prov["models"]
    assert sorted(second.measured) == sorted(map(str, files[20:]))
    assert images_part.is_file() and not list(out.rglob(".tmp-*"))
    want = reference.filter(pa.compute.is_in(reference.column("file"),
                                             pa.array([str(f) for f in files])))
    _assert_same(out, want)
    third = measure_on_ray(files, load_config(None, {}), out)
    assert third.measured == [] and len(third.skipped_done) == len(files)
    assert _provenance(out) == prov and third.provenance is None  # nothing done: left as it was


def test_provenance_names_the_cluster_the_work_ran_on(cluster: None, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Ray initialised by the caller (the module's local cluster): the work runs there, whatever
    address is asked for, and ``_run.json`` says so (it said "local", or the address asked)."""
    files = _synthetic(tmp_path / "frames", 2, 3)
    gcs = ray.get_runtime_context().gcs_address
    assert re.fullmatch(r"[^:]+:\d+", gcs), gcs
    report = measure_on_ray(files, load_config(None, {}), tmp_path / "out", workers=1,
                            address="ray://10.255.255.1:10001")
    assert sorted(report.measured) == sorted(map(str, files)) and not report.failed
    assert ray.is_initialized()  # not stopped: the caller's
    prov = _provenance(tmp_path / "out")["ray"]
    assert prov["address"] == gcs
    assert prov["address_requested"] == "ray://10.255.255.1:10001"
    assert prov["started_here"] is False
    assert (f"measuring on the cluster it joined (GCS {gcs}); the address "
            "ray://10.255.255.1:10001 is not used" in caplog.text)
