"""python -m bench [--corpus DIR] [--heavy] [--repeat N] [--only a,b] [--quick] [--out-dir DIR]

Runs the sections in order and writes `<out-dir>/latest.md` and `latest.json` after each one,
so a failure or an interruption keeps what was measured. A --quick run writes `quick.*` (not
kept in git) and a --only run `only-<sections>[-heavy].*`: neither overwrites the full run the
README quotes.
"""

from __future__ import annotations

import argparse
import compileall
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import (
    accuracy,
    bert,
    calibration,
    controlflow,
    exports,
    gptq,
    hardswish,
    weightquant,
    weights,
)
from .common import GB, Context, Section, machine
from .report import write

SECTIONS = {"calibration": calibration, "bert": bert, "weightquant": weightquant,
            "controlflow": controlflow, "hardswish": hardswish, "gptq": gptq,
            "accuracy": accuracy, "weights": weights, "exports": exports}


def _default_cap() -> float:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (ValueError, OSError):
        return 20.0
    return float(min(20, int(total * 0.8)))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure ptqconv against onnxruntime's quantizer (calibration cost, BERT, "
                    "WeightQuant, quantized control-flow bodies, hard-swish spellings, corpus "
                    "accuracy) and write "
                    "<out-dir>/latest.md and .json.")
    parser.add_argument("--corpus", type=Path, default=os.environ.get("PTQCONV_CORPUS"),
                        help="corpus directory built by ../shared/corpus/build_corpus.sh "
                             "(default: $PTQCONV_CORPUS); the accuracy section skips without it")
    parser.add_argument("--heavy", action="store_true",
                        help="also the slow and memory-hungry cases: onnxruntime Entropy at "
                             "1,000 CNN samples and on BERT (capped), BERT at 300 samples, the "
                             "3 GB WeightQuant model, every CNN case repeated")
    parser.add_argument("--repeat", type=int, default=3, help="runs per timed case (median)")
    parser.add_argument("--only", default="",
                        help=f"comma-separated sections among {','.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and sample counts, one run each: a plumbing check")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent,
                        help="where the .md and .json go (default: bench/)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="onnxruntime and ptqconv threads (default: all cores)")
    parser.add_argument("--mem-cap-gb", type=float, default=_default_cap(),
                        help="memory cap of every timed child, above which it is stopped and "
                             "reported out of memory (default: 80%% of RAM, at most 20)")
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; "
                     f"allowed: {', '.join(SECTIONS)}")
    args.sections = only or list(SECTIONS)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    stem = "quick" if args.quick else (
        "latest" if args.sections == list(SECTIONS)
        else "only-" + "-".join(args.sections) + ("-heavy" if args.heavy else ""))
    meta = {
        "command": shlex.join(["python", "-m", "bench", *argv]),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "quick": args.quick,
        "heavy": args.heavy,
        "repeat": args.repeat,
        "machine": machine(),
        "wall_seconds": 0.0,
    }
    sections: list[Section] = []
    start = time.perf_counter()
    # Every case runs in a child process that imports ptqconv afresh. A pip install leaves
    # bytecode behind; with PYTHONDONTWRITEBYTECODE set (some CI and sandbox shells) an
    # editable install would be compiled again in every child, 0.2 s a conversion.
    compileall.compile_dir(Path(__file__).resolve().parent.parent / "ptqconv", quiet=1)
    with tempfile.TemporaryDirectory(prefix="ptqconv-bench-") as tmp:
        ctx = Context(tmp=Path(tmp), repeat=1 if args.quick else args.repeat, heavy=args.heavy,
                      quick=args.quick, corpus=args.corpus, threads=args.threads,
                      mem_cap_gb=args.mem_cap_gb, start=start)
        ctx.log(f"bench: {', '.join(args.sections)}"
                f"{' (quick)' if args.quick else ''}{' (heavy)' if args.heavy else ''}; "
                f"writing {args.out_dir / stem}.md/.json")
        for name in args.sections:
            ctx.log(f"section {name}")
            t0 = time.perf_counter()
            try:
                section = SECTIONS[name].run(ctx)
            except Exception as exc:  # keep the other sections' figures
                traceback.print_exc()
                section = Section(name, name, error=f"{type(exc).__name__}: {exc}")
            section.seconds = time.perf_counter() - t0
            sections.append(section)
            ctx.log(f"section {name} done in {section.seconds:.0f} s"
                    f"{': FAILED ' + section.error if section.error else ''}")
            meta["wall_seconds"] = time.perf_counter() - start
            md, js = write(args.out_dir, stem, meta, sections)
    meta["load_average_end"] = os.getloadavg()
    meta["wall_seconds"] = time.perf_counter() - start
    md, js = write(args.out_dir, stem, meta, sections)
    print(f"[{meta['wall_seconds']:7.1f} s] wrote {md} and {js}", flush=True)
    return 1 if any(s.error for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
