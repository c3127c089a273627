"""What the monitoring mixin costs to render: each output, the default _config against a custom one.

The default _config is the baseline of the same run (it renders the committed files as they are);
the custom one is tests/test_mixin.py's (job, cluster and namespace selectors, two aggregation
labels), for which mixin/promql.libsonnet rewrites every expression. CPU seconds per render,
with the PyPI `jsonnet` package the tests use.

    python benchmarks/bench_mixin.py [--runs 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import _jsonnet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_mixin import CUSTOM  # noqa: E402

OUTPUTS = ("prometheusAlerts", "prometheusRules", "grafanaDashboards")


def cpu_seconds(config: str, output: str) -> float:
    snippet = f"((import 'mixin.libsonnet') + {config}).{output}"
    began = time.process_time()
    _jsonnet.evaluate_snippet("bench", snippet, jpathdir=[str(ROOT)])
    return time.process_time() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="renders of each, the median reported")
    args = parser.parse_args()
    print(f"jsonnet {_jsonnet.version}, median CPU seconds of {args.runs} renders")
    print(f"{'output':<18} {'default':>8} {'custom':>8} {'ratio':>6}")
    totals = {"{}": 0.0, CUSTOM: 0.0}
    for output in OUTPUTS:
        medians = {}
        for config in totals:
            medians[config] = statistics.median(cpu_seconds(config, output) for _ in range(args.runs))
            totals[config] += medians[config]
        base, custom = medians["{}"], medians[CUSTOM]
        print(f"{output:<18} {base:>7.2f}s {custom:>7.2f}s {custom / base:>5.1f}x")
    print(f"{'all three':<18} {totals['{}']:>7.2f}s {totals[CUSTOM]:>7.2f}s {totals[CUSTOM] / totals['{}']:>5.1f}x")


if __name__ == "__main__":
    main()
