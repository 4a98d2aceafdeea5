"""Start-up cost of the command line: help and listings against a bare Python, side by side.

Each command runs in a fresh process (as a user types it), several times, interleaved with the
baseline ``python -c pass``; the script prints the median wall time, the peak memory of the
process and the ratios to the baseline. ``import torch`` is shown for scale: none of the
listings should pay it.

    python benchmarks/bench_cli.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PY = sys.executable
# Peak RSS of one child process, measured by a tiny parent that runs it.
_PROBE = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)\n"
    "dt = time.perf_counter() - t\n"
    "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)
COMMANDS = {
    "python -c pass": [PY, "-c", "pass"],
    "python -c 'import torch'": [PY, "-c", "import torch"],
    "clinadapt --help": [PY, "-m", "clinadapt.cli", "--help"],
    "clinadapt --version": [PY, "-m", "clinadapt.cli", "--version"],
    "clinadapt models": [PY, "-m", "clinadapt.cli", "models"],
    "clinadapt methods": [PY, "-m", "clinadapt.cli", "methods"],
    "clinadapt datasets": [PY, "-m", "clinadapt.cli", "datasets"],
    "clinadapt targets --json": [PY, "-m", "clinadapt.cli", "targets", "--json"],
    "clinadapt shifts": [PY, "-m", "clinadapt.cli", "shifts"],
    "clinadapt corruptions": [PY, "-m", "clinadapt.cli", "corruptions"],
}


def measure(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one run of ``argv``."""
    out = subprocess.run([PY, "-c", _PROBE, *argv], capture_output=True, text=True, check=True)
    seconds, kib = out.stdout.split()
    return float(seconds), int(kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    os.environ.setdefault("COLUMNS", "120")
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    peaks: dict[str, float] = dict.fromkeys(COMMANDS, 0.0)
    measure(COMMANDS["clinadapt --help"])  # warm the file cache once
    for _ in range(args.repeats):  # interleaved, so load on the machine hits every row alike
        for name, argv in COMMANDS.items():
            seconds, mib = measure(argv)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], mib)
    base_t = statistics.median(times["python -c pass"])
    base_m = peaks["python -c pass"]
    rows = []
    for name in COMMANDS:
        t = statistics.median(times[name])
        rows.append(
            {
                "command": name,
                "median_s": round(t, 3),
                "time_ratio": round(t / base_t, 1),
                "peak_mib": round(peaks[name], 1),
                "memory_ratio": round(peaks[name] / base_m, 1),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'command':28s} {'median s':>9s} {'x pass':>7s} {'peak MiB':>9s} {'x pass':>7s}")
    for r in rows:
        print(
            f"{r['command']:28s} {r['median_s']:9.3f} {r['time_ratio']:7.1f} "
            f"{r['peak_mib']:9.1f} {r['memory_ratio']:7.1f}"
        )
    print(f"({args.repeats} runs each, interleaved; {time.strftime('%Y-%m-%d %H:%M')})")


if __name__ == "__main__":
    main()
