"""The benchmark's ``conversion`` section: what ``to_plain`` and graph pruning cost, in time
and memory.

Each source is converted in a fresh process (``python -m keras_dmr.bench.conversion NAME``), so
that the peak resident memory it reports (``ru_maxrss``) is the conversion's and not what an
earlier one left behind. Timed: ``to_plain(model)`` with its default verification (two random
single-image batches through both models), after the source model is built and randomized.
The process's memory before the conversion (Python, TensorFlow, the source model) is reported
beside the peak.

The target source's plain form (``fuse_bn=False``, as it is pruned) is then pruned over its
whole graph to half its MACs (``prune_channels(plain, macs=0.5)``) in another fresh process
(``--prune NAME``): timed alone, its peak the largest resident memory sampled every 5 ms while it
runs (the conversion before it has its own peak, so ``ru_maxrss`` would not say).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable


def _keras_resnet50():
    import keras

    return keras.applications.ResNet50(weights=None)


def _keras_mobilenet_v2():
    import keras

    return keras.applications.MobileNetV2(weights=None)


def _rmnext152():
    from keras_dmr.models import RMNeXt

    return RMNeXt(depth=152, expansion=6, channels_per_group=32, variant="imagenet", compile=False)


# name → builder; the quick run converts the first only.
SOURCES: dict[str, Callable] = {
    "keras.applications.ResNet50 (224²)": _keras_resnet50,
    "keras.applications.MobileNetV2 (224²)": _keras_mobilenet_v2,
    "RMNeXt 152×6_32 (ImageNet, 224²)": _rmnext152,
}
# The budget for the first source on a 2-core machine: convert and verify.
TARGET = {"source": "keras.applications.ResNet50 (224²)", "seconds": 10.0, "peak_gb": 3.0}
# Issue 28's budget for pruning that source's plain form over its whole graph.
PRUNE_TARGET = {"source": TARGET["source"], "macs": 0.5, "seconds": 10.0, "peak_gb": 3.0}
PRUNE_OPERATION = f"prune_channels(plain, macs={PRUNE_TARGET['macs']:g})"


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def measure(name: str) -> dict:
    """Convert one source in this process; its figures (call in a fresh process)."""
    from keras_dmr.convert import randomize, to_plain

    model = randomize(SOURCES[name](), 0)
    before = _rss_gb()
    started = time.perf_counter()
    plain = to_plain(model)
    seconds = time.perf_counter() - started
    report = plain.conversion_report
    return {
        "source": name,
        "seconds": seconds,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "rss_before_gb": before,
        "max_relative_error": report["max_relative_error"],
        "params_before": report["params_before"],
        "params_after": report["params_after"],
    }


class _PeakSampler:
    """The largest resident memory seen every 5 ms while the ``with`` block runs."""

    def __enter__(self):
        self.gb, self._stop = _rss_gb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.gb = max(self.gb, _rss_gb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.gb = max(self.gb, _rss_gb())


def measure_pruning(name: str) -> dict:
    """Prune one source's plain form to the target's MACs in this process; its figures."""
    import gc

    from keras_dmr.convert import randomize, to_plain
    from keras_dmr.prune import prune_channels

    plain = to_plain(randomize(SOURCES[name](), 0), fuse_bn=False, verify=False)
    gc.collect()
    before = _rss_gb()
    with _PeakSampler() as peak:
        started = time.perf_counter()
        pruned = prune_channels(plain, macs=PRUNE_TARGET["macs"])
        seconds = time.perf_counter() - started
    report = pruned.pruning_report
    return {
        "source": name,
        "operation": PRUNE_OPERATION,
        "seconds": seconds,
        "peak_gb": peak.gb,
        "rss_before_gb": before,
        "params_before": report["params_before"],
        "params_after": report["params_after"],
        "macs_fraction": report["macs_after"] / report["macs_before"],
    }


def _in_fresh_process(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "keras_dmr.bench.conversion", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"source": args[-1], "error": (proc.stderr or proc.stdout)[-500:]}
    return json.loads(lines[-1])


def run_section(quick: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    """Every source (the first only with ``quick``), each in its own process, then the target
    source's plain form pruned (:func:`measure_pruning`) in another."""
    rows = []
    for name in list(SOURCES)[: 1 if quick else None]:
        log(f"conversion: {name}")
        rows.append(_in_fresh_process(name))
    log(f"pruning: {PRUNE_TARGET['source']}, {PRUNE_OPERATION}")
    row = _in_fresh_process("--prune", PRUNE_TARGET["source"])
    rows.append({"operation": PRUNE_OPERATION, **row})
    return rows


def table(rows: list[dict]) -> str:
    if not rows:
        return "_not measured in this run_ (`keras-dmr bench --sections conversion`)"
    lines = [
        "| source | operation | time (s) | peak memory (GB) | before (GB) | params before "
        "| params after | result |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        operation = r.get("operation", "to_plain + verify")
        if "error" in r:
            lines.append(f"| {r['source']} | {operation} | failed | | | | | |")
            continue
        if "max_relative_error" in r:
            result = f"max rel. error {r['max_relative_error']:.1e}"
        else:
            result = f"MACs kept {r['macs_fraction']:.1%}"
        lines.append(
            f"| {r['source']} | {operation} | {r['seconds']:.1f} | {r['peak_gb']:.2f} "
            f"| {r['rss_before_gb']:.2f} | {r['params_before'] / 1e6:.1f}M "
            f"| {r['params_after'] / 1e6:.1f}M | {result} |"
        )
    return "\n".join(lines)


def _time_and_memory(row: dict, budget: dict) -> list[dict]:
    return [
        {
            "what": "time",
            "value": row["seconds"],
            "unit": "s",
            "met": row["seconds"] <= budget["seconds"],
        },
        {
            "what": "peak memory",
            "value": row["peak_gb"],
            "unit": "GB",
            "met": row["peak_gb"] <= budget["peak_gb"],
        },
    ]


def pruning_target(rows: list[dict]) -> dict | None:
    """The graph-pruning row of the target table (None when not measured)."""
    row = next(
        (
            r
            for r in rows
            if r["source"] == PRUNE_TARGET["source"]
            and r.get("operation") == PRUNE_OPERATION
            and "error" not in r
        ),
        None,
    )
    if row is None:
        return None
    return {
        "target": "Graph pruning of ResNet-50's plain form (224²) to "
        f"macs={PRUNE_TARGET['macs']:g}",
        "rule": f"≤ {PRUNE_TARGET['seconds']:g} s and ≤ {PRUNE_TARGET['peak_gb']:g} GB",
        "values": _time_and_memory(row, PRUNE_TARGET),
        "paper": "issue 28",
    }


def target(rows: list[dict]) -> dict | None:
    """The conversion row of the benchmark's target table (None when not measured)."""
    row = next(
        (
            r
            for r in rows
            if r["source"] == TARGET["source"] and "operation" not in r and "error" not in r
        ),
        None,
    )
    if row is None:
        return None
    return {
        "target": "to_plain of keras.applications ResNet-50 (224²), verified",
        "rule": f"≤ {TARGET['seconds']:g} s and ≤ {TARGET['peak_gb']:g} GB",
        "values": _time_and_memory(row, TARGET),
        "paper": "issue 15 (before the graph converter: 11 s, 4.5 GB)",
    }


if __name__ == "__main__":
    if sys.argv[1] == "--prune":
        print(json.dumps(measure_pruning(sys.argv[2])))
    else:
        print(json.dumps(measure(sys.argv[1])))
