"""Shared helpers for the bench scripts: child-process runs with time and peak RSS."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_child(code: str, repeat: int = 3) -> dict[str, float]:
    """Run `code` in fresh Python processes; median wall time and peak RSS (MB) over runs.

    Each run is its own process. Peak RSS is the child's VmHWM: ru_maxrss would not do, as
    Linux carries it over fork and exec from the parent (which built the models).
    """
    times, peaks = [], []
    for _ in range(repeat):
        wrapper = (
            "import time, json\n"
            "t0 = time.perf_counter()\n"
            f"exec({code!r})\n"
            "t = time.perf_counter() - t0\n"
            "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0]\n"
            "rss = int(hwm.split()[1]) / 1024\n"
            "print('@@' + json.dumps({'seconds': t, 'rss_mb': rss}))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", wrapper], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"bench child failed:\n{result.stderr[-2000:]}")
        line = next(x for x in result.stdout.splitlines() if x.startswith("@@"))
        figures = json.loads(line[2:])
        times.append(figures["seconds"])
        peaks.append(figures["rss_mb"])
    return {"seconds": statistics.median(times), "rss_mb": statistics.median(peaks)}


def machine() -> str:
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def now() -> str:
    return time.strftime("%Y-%m-%d")
