"""How fast the command line answers ``--help``, against the Python interpreter starting alone.

    python benchmarks/cli_startup.py            # 7 interleaved rounds
    python benchmarks/cli_startup.py --rounds 15

Each round runs, one after the other, ``python -c pass`` (the baseline), ``python -m tl_loop
--help``, ``python -m tl_loop report --help``, ``python -m tl_loop info --help`` and ``python -c
"import torch, transformer_lens"`` (what every command cost before the imports became lazy), in
fresh processes with this checkout first on ``sys.path``. Prints the median wall time of each and
its ratio to the baseline of the same round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES: dict[str, list[str]] = {
    "python -c pass": ["-c", "pass"],
    "tl-loop --help": ["-m", "tl_loop", "--help"],
    "tl-loop report --help": ["-m", "tl_loop", "report", "--help"],
    "tl-loop info --help": ["-m", "tl_loop", "info", "--help"],
    "import torch, transformer_lens": ["-c", "import torch, transformer_lens"],
}


def wall(args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True, env=env, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    rounds = parser.parse_args().rounds
    times: dict[str, list[float]] = {k: [] for k in CASES}
    ratios: dict[str, list[float]] = {k: [] for k in CASES}
    for _ in range(rounds):
        base = None
        for name, args in CASES.items():
            t = wall(args)
            base = t if base is None else base
            times[name].append(t)
            ratios[name].append(t / base)
    print(f"{rounds} rounds, load average before the last round: {os.getloadavg()[0]:.1f}")
    print("| command | median wall time | / python -c pass |\n|---|---|---|")
    for name in CASES:
        print(f"| `{name}` | {statistics.median(times[name]):.2f} s | {statistics.median(ratios[name]):.1f}x |")


if __name__ == "__main__":
    main()
