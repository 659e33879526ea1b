"""Wall time of `deepcast plan` for every registry model on every target, each as its own process.

    python bench/plan_speed.py

Prints one JSON line: pairs, median and slowest seconds, and the slowest pair.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEEPCAST = Path(sys.executable).with_name("deepcast")


def main() -> None:
    models = sorted(p.stem for p in (REPO / "config" / "models").glob("*.yaml"))
    targets = sorted(p.stem for p in (REPO / "config" / "targets").glob("*.yaml"))
    times = {}
    for model in models:
        for target in targets:
            started = time.perf_counter()
            result = subprocess.run([DEEPCAST, "plan", "--model", model, "--target", target, "--json"],
                                    capture_output=True, cwd=REPO)  # fmt: skip
            times[f"{model} on {target}"] = time.perf_counter() - started
            if result.returncode not in (0, 1):  # 1: fits nowhere, with the nearest plan
                raise SystemExit(result.stderr.decode())
    slowest = max(times, key=times.get)
    print(json.dumps({
        "pairs": len(times), "median_s": round(statistics.median(times.values()), 3),
        "slowest_s": round(times[slowest], 3), "slowest": slowest,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
