"""Overview figures on a 1,000,000-entry Suspicious IP log and 100,000 blocks.

Run as `.venv/bin/python -m bench.overview`. Uses the console benchmark's
database (bench/console.py builds and caches it: episodes over 30 days, half
the blocks lifted), then prints p50/p95 of working out each period's figures,
what the Overview page shows when its cache is cold. Asserts nothing.
"""

import argparse
import statistics
import time

from appliance import models
from appliance.overview import PERIODS
from appliance.overview import overview
from bench.console import cached_database


def percentile(samples, fraction):
    """The sample at a fraction of the sorted list (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main():
    """Time each period's figures on the console benchmark's database."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--blocks", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=10)
    options = parser.parse_args()

    path, end = cached_database(options.entries, options.blocks)
    models.connect(path)
    print(f"{options.entries:,} entries, {options.blocks:,} blocks ({path.name})")
    for period in PERIODS:
        timings = []
        for _ in range(options.runs):
            started = time.perf_counter()
            figures = overview(period, now=end)
            timings.append((time.perf_counter() - started) * 1000)
        episodes = sum(sum(values) for values in figures.series.values())
        print(
            f"overview {period:>4}: p50 {statistics.median(timings):7.1f} ms, "
            f"p95 {percentile(timings, 0.95):7.1f} ms "
            f"({figures.suspicious_ips:,} suspicious IPs, {episodes:,} violations, "
            f"{figures.blocked_now:,} blocks in force)"
        )
    models.db.close()


if __name__ == "__main__":
    main()
