"""One bench case in a fresh process: `python -m bench.child CASE ARGS_JSON`, where CASE is a
function of `bench.cases` or `module:function`.

Times the case (its imports included: every tool pays its own), then prints one line,
`@@` and JSON: seconds, CPU seconds of all its threads, peak RSS from VmHWM (not ru_maxrss,
which Linux carries over fork and exec from a parent that may have built a big model just
before) and the case's result.
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
import time


def main(argv: list[str]) -> None:
    name, args = argv[0], json.loads(argv[1])
    start = time.perf_counter()
    module, _, function = name.rpartition(":")
    result = getattr(importlib.import_module(module or "bench.cases"), function)(**args)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open("/proc/self/status") as status:
        hwm = next(line for line in status if line.startswith("VmHWM"))
    print("@@" + json.dumps({"seconds": seconds, "rss_mb": int(hwm.split()[1]) / 1024,
                             "cpu_seconds": usage.ru_utime + usage.ru_stime,
                             "result": result}))


if __name__ == "__main__":
    main(sys.argv[1:])
