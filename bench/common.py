"""Shared pieces of the bench: the run context, child-process measurement, markdown tables."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GB = 1 << 30


@dataclass
class Context:
    """What every section gets: the options of the run, a scratch directory and a logger."""

    tmp: Path
    repeat: int = 3
    heavy: bool = False
    quick: bool = False
    corpus: Path | None = None
    threads: int = 2
    mem_cap_gb: float = 20.0
    start: float = field(default_factory=time.perf_counter)

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {message}", flush=True)

    def scratch(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class Section:
    """One section of the report: its figures (`data`, for JSON) and its markdown text."""

    key: str
    title: str
    markdown: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class Measure:
    """Medians over the runs of one case; `error` set when a run failed (and `runs` stopped)."""

    runs: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None
    result: Any = None  # what the child code left in RESULT (last run)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.runs)

    @property
    def seconds(self) -> float:
        return statistics.median(r["seconds"] for r in self.runs) if self.runs else float("nan")

    @property
    def rss_mb(self) -> float:
        return statistics.median(r["rss_mb"] for r in self.runs) if self.runs else float("nan")

    @property
    def cpu_seconds(self) -> float:
        """User + system time of the child's threads (machine load inflates wall time)."""
        found = [r["cpu_seconds"] for r in self.runs if "cpu_seconds" in r]
        return statistics.median(found) if found else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds if self.runs else None,
                "rss_mb": self.rss_mb if self.runs else None,
                "runs": self.runs, "error": self.error, "result": self.result}


_OOM_SIGNS = ("MemoryError", "bad_alloc", "Failed to allocate", "Cannot allocate memory",
              "Unable to allocate")


def _reason(stderr: str, status: int) -> str:
    """The telling line of a failed child's stderr: its last error line, shortened."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    # A tool's own "...: error: ..." line says more than the AssertionError after it.
    tools = [ln for ln in lines if "error:" in ln]
    errors = [ln for ln in lines if "error" in ln.lower()]
    line = (tools or errors or lines or [f"exit status {status}"])[-1]
    return line if len(line) <= 220 else f"{line[:100]} … {line[-110:]}"


def _status_mb(pid: int, key: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            line = next(ln for ln in status if ln.startswith(key))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return 0.0


def run_child(case: str, args: dict[str, Any], repeat: int = 1,
              mem_cap_gb: float | None = None, timeout: float = 3600.0,
              address_cap: bool = True) -> Measure:
    """Run `bench.cases.<case>(**args)` in `repeat` fresh Python processes (`bench.child`);
    wall time and peak RSS of each run.

    With `mem_cap_gb` a run whose RSS passes the cap is killed and reported as "out of
    memory above N GB", so a tool that keeps everything in memory cannot take the machine
    down. The RSS is polled; `address_cap` also sets RLIMIT_AS, a hard limit for tools whose
    memory grows in big steps, but wrong for code that maps large files (onnx_ir maps the
    whole external-data file once per tensor: address space, not memory).
    """
    measure = Measure()
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    limit_mb = mem_cap_gb * 1024 if mem_cap_gb else None

    def cap() -> None:
        if mem_cap_gb and address_cap:
            limit = int(mem_cap_gb * GB)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    for _ in range(repeat):
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen([sys.executable, "-m", "bench.child", case,
                                     json.dumps(args)],
                                    stdout=out, stderr=err, text=True, env=env,
                                    preexec_fn=cap)
            peak, killed, deadline = 0.0, False, time.monotonic() + timeout
            while proc.poll() is None:
                # Polled too, for the peak of a run that dies before it can report it.
                peak = max(peak, _status_mb(proc.pid, "VmHWM"))
                if limit_mb and _status_mb(proc.pid, "VmRSS") > limit_mb:
                    proc.kill()
                    killed = True
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    measure.error = f"timed out after {timeout:.0f} s"
                    return measure
                time.sleep(0.05)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        report = next((x for x in stdout.splitlines() if x.startswith("@@")), None)
        if proc.returncode != 0 or report is None:
            if mem_cap_gb and (killed or any(s in stderr for s in _OOM_SIGNS)):
                measure.error = (f"out of memory above {mem_cap_gb:g} GB "
                                 f"(peak RSS seen {peak / 1024:.1f} GB)")
            else:
                measure.error = f"failed: {_reason(stderr, proc.returncode)}"
            return measure
        figures = json.loads(report[2:])
        measure.result = figures.pop("result")
        measure.runs.append(figures)
    return measure


def machine() -> dict[str, Any]:
    """CPU, cores, SIMD flags and library versions: what the figures depend on."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    from ptqconv.target import cpu_name

    cpu = cpu_name()
    import numpy
    import onnx
    import onnxruntime

    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (ValueError, OSError):
        mem_gb = float("nan")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "simd": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni",
                                                 "avx512bw", "fma")),
        "vnni": any("vnni" in f for f in flags),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": numpy.__version__,
    }


def machine_line(info: dict[str, Any]) -> str:
    simd = ", ".join(info["simd"]) or "no AVX2"
    return (f"{info['cpu']}, {info['cores']} cores, {info['memory_gb']:g} GB, {simd}"
            f"{'' if info['vnni'] else ' (no VNNI)'}; Python {info['python']}, "
            f"onnxruntime {info['onnxruntime']}, onnx {info['onnx']}, numpy {info['numpy']}")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
          left: int = 1) -> str:
    """A markdown table; the first `left` columns are text, the others right-aligned."""
    align = ["---"] * left + ["---:"] * (len(headers) - left)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    """A number for a table cell; '–' for a missing one."""
    if value is None or value != value:
        return "–"
    return f"{value:.{digits}f}{suffix}"


def ratio(a: Measure, b: Measure, attr: str) -> float | None:
    if not (a.ok and b.ok):
        return None
    denominator = getattr(b, attr)
    return getattr(a, attr) / denominator if denominator else None


def measure_cell(m: Measure, attr: str, digits: int = 2, why: bool = True) -> str:
    """A time or RSS figure, or (with `why`) the reason it is missing."""
    if m.ok:
        return fmt(getattr(m, attr), digits)
    return (m.error or "not run") if why else "–"


def guarded(ctx: Context, label: str, fn: Callable[[], Measure]) -> Measure:
    """Run one case, log its outcome; the bench goes on whatever happens."""
    try:
        m = fn()
    except Exception as exc:  # a bench bug in one case should not lose the others
        m = Measure(error=f"bench error: {type(exc).__name__}: {exc}"[:300])
    if m.ok:
        ctx.log(f"  {label}: {m.seconds:.2f} s, {m.rss_mb:.0f} MB "
                f"(median of {len(m.runs)})")
    else:
        ctx.log(f"  {label}: {m.error}")
    return m
