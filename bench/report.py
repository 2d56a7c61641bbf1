"""The bench's outputs: one markdown file (quoted by the README) and one JSON file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .common import Section, machine_line


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
