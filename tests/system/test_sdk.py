"""The SDK against a live daemon: the documented acquisition-script example publishes, the
asyncio subscriber receives, and the tables go to pandas."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from nanoscout.clients.aio import AsyncSubscriber
from tests.system.conftest import DaemonFactory

pytestmark = pytest.mark.system

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "publish_from_acquisition.py"


def test_example_script_publishes_and_async_subscriber_receives(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("--policy", "lossless")
    n = 3

    async def collect() -> list:
        got = []
        async with AsyncSubscriber(d.output, topics=("det.my-camera",)) as sub:
            await sub.wait_ready(30)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(EXAMPLE), d.input, str(n), stdout=subprocess.PIPE)
            async for msg in sub.messages(timeout=120):
                got.append(msg)
                if len(got) == n:
                    break
            out, _ = await proc.communicate()
            assert proc.returncode == 0 and b"sent 3 frames" in out
        return got

    msgs = asyncio.run(collect())
    assert [m.header.seq for m in msgs] == [0, 1, 2]
    assert all(m.header.units == "nm" and m.header.meta["file"] == f"frame-{k}"
               for k, m in enumerate(msgs))
    df = msgs[0].to_pandas()
    # 25 bright disks of radius 8 px at 0.5 nm/px: ECD about 8 nm
    assert len(df) >= 15 and 6 < df.loc[~df["border"], "ecd_nm"].median() < 10
    assert (df["ecd_px"] * 0.5).round(3).equals(df["ecd_nm"].round(3))


def test_async_subscriber_times_out_cleanly(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()

    async def idle() -> list:
        async with AsyncSubscriber(d.output, topics=("det.nobody",)) as sub:
            await sub.wait_ready(30)
            return [m async for m in sub.messages(idle=0.5)]

    assert asyncio.run(idle()) == []


def test_a_cancelled_wait_ready_does_not_hold_up_leaving_the_async_with(tmp_path: Path) -> None:
    """Once ``wait_ready`` blocked the worker for its whole timeout, and ``close`` waited behind
    it: leaving the ``async with`` took 20 s instead of about ``poll_s``."""

    async def cancelled() -> tuple[float, float]:
        t0 = loop_time()
        async with AsyncSubscriber(f"ipc://{tmp_path}/nobody", poll_s=0.1) as sub:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(sub.wait_ready(timeout=20), 0.5)
            t_cancel = loop_time() - t0
        return t_cancel, loop_time() - t0

    def loop_time() -> float:
        return asyncio.get_running_loop().time()

    t_cancel, t_left = asyncio.run(cancelled())
    assert t_cancel < 2 and t_left - t_cancel < 2, (t_cancel, t_left)

    async def times_out() -> None:
        async with AsyncSubscriber(f"ipc://{tmp_path}/nobody", poll_s=0.1) as sub:
            with pytest.raises(TimeoutError, match="nobody within 0.3 s"):
                await sub.wait_ready(timeout=0.3)

    asyncio.run(times_out())
