"""The bench's outputs: one markdown file (quoted by the README) and one JSON file."""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .common import Section, machine, machine_line


def _clean(value: Any) -> Any:
    """JSON has no NaN: missing figures become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _loads(values: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in values)


def render_markdown(meta: dict[str, Any], sections: list[Section]) -> str:
    lines = [
        "# ptqconv bench" + (" (QUICK: tiny sizes, plumbing check only)" if meta["quick"]
                             else ""),
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; total wall time {meta['wall_seconds'] / 60:.1f} min",
        f"- machine: {machine_line(meta['machine'])}",
        f"- load average at start: {_loads(meta['machine']['load_average'])}"
        + (f", at end: {_loads(meta['load_average_end'])}" if "load_average_end" in meta
           else ""),
        "",
    ]
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.error:
            lines += [f"**Section failed:** {s.error}", ""]
        if s.markdown:
            lines += [s.markdown.rstrip(), ""]
        lines += [f"_Section time: {s.seconds:.0f} s._", ""]
    return "\n".join(lines)


def write(out_dir: Path, stem: str, meta: dict[str, Any], sections: list[Section]) -> tuple[
        Path, Path]:
    """Write `<stem>.md` and `<stem>.json` in `out_dir`; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    md.write_text(render_markdown(meta, sections))
    payload = {**meta, "sections": {s.key: {"title": s.title, "error": s.error,
                                            "seconds": s.seconds, "data": s.data}
                                    for s in sections}}
    js.write_text(json.dumps(_clean(payload), indent=1, sort_keys=False) + "\n")
    return md, js


def standalone(module: str, argv: Sequence[str] | None, out_dir: Path,
               build: Callable[[Path, Callable[[str], None]], Section]) -> int:
    """`python -m bench.<module>` on its own: `build(tmp, log)` makes the one section in a
    temporary directory; `<out_dir>/<module>.md` and `.json` get it with the run's machine,
    date and command, and the markdown is printed."""
    start = time.perf_counter()
    info = machine()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)

    with tempfile.TemporaryDirectory(prefix=f"ptqconv-{module}-") as tmp:
        result = build(Path(tmp), log)
    meta = {"command": shlex.join(["python", "-m", f"bench.{module}",
                                   *(argv if argv is not None else sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": info, "quick": False,
            "wall_seconds": time.perf_counter() - start, "load_average_end": os.getloadavg()}
    md, _ = write(out_dir, module, meta, [result])
    print(md.read_text())
    return 0
