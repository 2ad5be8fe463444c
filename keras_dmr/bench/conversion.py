"""The benchmark's ``conversion`` section: what ``to_plain`` costs, in time and memory.

Each source is converted in a fresh process (``python -m keras_dmr.bench.conversion NAME``), so
that the peak resident memory it reports (``ru_maxrss``) is the conversion's and not what an
earlier one left behind. Timed: ``to_plain(model)`` with its default verification (two random
single-image batches through both models), after the source model is built and randomized.
The process's memory before the conversion (Python, TensorFlow, the source model) is reported
beside the peak.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
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


def run_section(quick: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    """Every source (the first only with ``quick``), each in its own process."""
    rows = []
    for name in list(SOURCES)[: 1 if quick else None]:
        log(f"conversion: {name}")
        proc = subprocess.run(
            [sys.executable, "-m", "keras_dmr.bench.conversion", name],
            capture_output=True,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            rows.append({"source": name, "error": (proc.stderr or proc.stdout)[-500:]})
        else:
            rows.append(json.loads(lines[-1]))
    return rows


def table(rows: list[dict]) -> str:
    if not rows:
        return "_not measured in this run_ (`keras-dmr bench --sections conversion`)"
    lines = [
        "| source | convert + verify (s) | peak memory (GB) | before (GB) | params | plain params "
        "| max rel. error |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['source']} | failed | | | | | |")
            continue
        lines.append(
            f"| {r['source']} | {r['seconds']:.1f} | {r['peak_gb']:.2f} | {r['rss_before_gb']:.2f} "
            f"| {r['params_before'] / 1e6:.1f}M | {r['params_after'] / 1e6:.1f}M "
            f"| {r['max_relative_error']:.1e} |"
        )
    return "\n".join(lines)


def target(rows: list[dict]) -> dict | None:
    """The conversion row of the benchmark's target table (None when not measured)."""
    row = next((r for r in rows if r["source"] == TARGET["source"] and "error" not in r), None)
    if row is None:
        return None
    return {
        "target": "to_plain of keras.applications ResNet-50 (224²), verified",
        "rule": f"≤ {TARGET['seconds']:g} s and ≤ {TARGET['peak_gb']:g} GB",
        "values": [
            {
                "what": "time",
                "value": row["seconds"],
                "unit": "s",
                "met": row["seconds"] <= TARGET["seconds"],
            },
            {
                "what": "peak memory",
                "value": row["peak_gb"],
                "unit": "GB",
                "met": row["peak_gb"] <= TARGET["peak_gb"],
            },
        ],
        "paper": "issue 15 (before the graph converter: 11 s, 4.5 GB)",
    }


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
