"""Training-step and inference cost of each channel method against its baseline.

    python benchmarks/methods.py [--method ce|gated|selectconv|csg] [--quick]   (from the repo root)

Each method's module (bench_<method>.py beside this file) measures its alternatives interleaved
in one run (benchmarks/common.py) and returns JSON-able records; this script prints them, one
JSON line each.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bench modules' `benchmarks.`
from benchmarks.common import emit  # noqa: E402

BENCHES = {"ce": "benchmarks.bench_ce", "gated": "benchmarks.bench_gating",
           "selectconv": "benchmarks.bench_selectconv", "csg": "benchmarks.bench_csg"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(BENCHES), action="append")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller inputs")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for method in args.method or sorted(BENCHES):
        for record in importlib.import_module(BENCHES[method]).run(quick=args.quick):
            emit({"method": method, "threads": args.threads, **record})


if __name__ == "__main__":
    main()
