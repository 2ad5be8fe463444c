"""The benchmark's ``train`` section: one worker process per Keras backend, candidates
interleaved across them, failures recorded; its table. No assertion is about which candidate
is faster."""

from __future__ import annotations

import importlib.util
import json

import pytest

from keras_dmr.bench import report
from keras_dmr.bench import train_throughput as tt


def _record(model, backend, policy, speed=None, error=None):
    r = {"model": model, "backend": backend, "policy": policy}
    if speed is not None:
        r.update(images_per_s=speed, step_ms=64e3 / speed)
    if error is not None:
        r["error"] = error
    return r


def _section(results, backends=None):
    backends = backends or {
        "tensorflow": {"device": "/CPU:0", "versions": {"keras": "3", "tensorflow": "2"}},
        "jax": {"device": "cpu:0", "versions": {"keras": "3", "jax": "0.1"}},
    }
    return {
        "batch_size": 64,
        "warmup": 5,
        "iters": 1,
        "repeats": 3,
        "cpu_flags": ["avx2", "fma"],
        "backends": backends,
        "results": results,
    }


def test_ratios_are_to_tensorflow_float32_of_the_same_model():
    section = _section(
        [
            _record("A", "tensorflow", "float32", 100.0),
            _record("A", "tensorflow", "mixed_bfloat16", 50.0),
            _record("A", "jax", "float32", 150.0),
            _record("A", "jax", "mixed_bfloat16", error="RuntimeError: no"),
            _record("B", "jax", "float32", 40.0),  # no TensorFlow float32 row: its first row
            _record("B", "jax", "mixed_bfloat16", 80.0),
        ]
    )
    tt._add_ratios(section)
    rows = {(r["model"], r["backend"], r["policy"]): r for r in section["results"]}
    assert rows[("A", "tensorflow", "float32")]["relative"] == 1.0
    assert rows[("A", "tensorflow", "mixed_bfloat16")]["relative"] == 0.5
    assert rows[("A", "jax", "float32")]["relative"] == 1.5
    assert "relative" not in rows[("A", "jax", "mixed_bfloat16")]
    assert rows[("B", "jax", "mixed_bfloat16")]["relative"] == 2.0
    assert rows[("B", "jax", "mixed_bfloat16")]["relative_to"] == "jax float32"

    text = tt.table(section)
    assert "| model | tensorflow float32 | tensorflow mixed_bfloat16 | jax float32 |" in text
    assert "| A | 100 (1.00×) | 50 (0.50×) | **150 (1.50×)** | failed | jax float32 |" in text
    assert "| B | – | – | 40 (1.00×) | **80 (2.00×)** | jax mixed_bfloat16 |" in text
    assert "A on jax mixed_bfloat16 failed: RuntimeError: no" in text
    assert "3 interleaved rounds of 1 step, batch 64" in text and "avx2, fma" in text


def test_a_backend_that_is_missing_is_named_and_its_columns_left_out():
    section = _section(
        [_record("A", "jax", "float32", 10.0)],
        backends={
            "tensorflow": {"error": "tensorflow is not installed"},
            "jax": {"device": "cuda:0", "versions": {"jax": "0.1"}},
        },
    )
    tt._add_ratios(section)
    text = tt.table(section)
    assert "tensorflow float32" not in text.splitlines()[0]
    assert "- tensorflow: tensorflow is not installed" in text
    assert tt.table(None).startswith("_not measured")


def test_missing_backend_is_recorded_without_a_worker(monkeypatch):
    monkeypatch.setattr(tt, "_installed", lambda backend: False)
    section = tt.run_section(quick=True, warmup=0, iters=1, repeats=1, log=lambda m: None)
    assert section["backends"] == {
        "tensorflow": {"error": "tensorflow is not installed"},
        "jax": {"error": "jax is not installed"},
    }
    assert section["results"] == []


def test_docs_show_each_machines_run_under_its_cpu(tmp_path):
    (tmp_path / "data").mkdir()
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "intro\n<!-- BEGIN bench-train -->\nold\n<!-- END bench-train -->\n"
        "<!-- BEGIN bench-deploy-machines -->\n<!-- END bench-deploy-machines -->\n"
    )
    section = _section([_record("A", "tensorflow", "float32", 100.0)])
    tt._add_ratios(section)
    for cpu in ("CPU one", "CPU two"):
        data = {
            "started_utc": "2026-12-06T22:00:00Z",
            "machine": {"cpu": cpu, "cores": 2, "cpu_flags": ["avx2"]},
            "train": section,
        }
        (tmp_path / "data" / f"benchmarks_train_{cpu[-3:]}.json").write_text(json.dumps(data))
    read = report.regenerate_per_machine(tmp_path)
    assert len(read) == 2
    text = doc.read_text()
    assert "old" not in text and "**CPU one** (avx2), 2 cores, 2026-12-06:" in text
    assert text.count("| A | **100 (1.00×)** |") == 2


@pytest.mark.slow
def test_workers_time_every_backend_and_policy_interleaved():
    """Both backends in their own processes, float32 and mixed_bfloat16, a tiny model."""
    backends = [b for b in tt.BACKENDS if importlib.util.find_spec(b)]
    logged = []
    section = tt.run_section(
        quick=True, batch_size=2, warmup=1, iters=1, repeats=2, backends=backends,
        log=logged.append,
    )  # fmt: skip
    assert set(section["backends"]) == set(backends)
    timed = [r for r in section["results"] if "images_per_s" in r]
    assert len(timed) == 2 * len(backends), section["results"]
    for r in timed:
        assert r["model"] == "ResNet-8" and len(r["samples_s"]) == 2 and r["images_per_s"] > 0
        assert r["compute_dtype"] == ("bfloat16" if r["policy"] == "mixed_bfloat16" else "float32")
        assert r["params"] == timed[0]["params"] and r["macs"] > 0
    assert any("A B A B" in m for m in logged)
    for backend in backends:
        assert section["backends"][backend]["versions"][backend]


@pytest.mark.slow
def test_a_candidate_that_fails_to_build_is_recorded_and_the_rest_timed():
    section = tt.run_section(
        models=("ResNet-8", "no such model"), backends=("tensorflow",), policies=("float32",),
        batch_size=2, warmup=0, iters=1, repeats=1, log=lambda m: None,
    )  # fmt: skip
    rows = {r["model"]: r for r in section["results"]}
    assert rows["ResNet-8"]["images_per_s"] > 0
    assert rows["no such model"]["error"].startswith("KeyError")


def test_the_docs_reading_of_the_measured_run_matches_its_json():
    """The figures docs/benchmarks.md states about the AMD EPYC run, from its JSON."""
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    data = json.loads((docs / "data" / "benchmarks_train_amd_epyc.json").read_text())
    rows = {(r["model"], r["backend"], r["policy"]): r for r in data["train"]["results"]}
    models = ("DMRNet-14", "ResNet-26", "MobileNetV2")
    assert all(r["relative"] <= 1 for r in rows.values())  # TensorFlow float32 fastest
    slower = [1 / rows[(m, "tensorflow", "mixed_bfloat16")]["relative"] for m in models]
    jax = [rows[(m, "jax", p)]["relative"] for m in models for p in tt.POLICIES]
    step = rows[("MobileNetV2", "tensorflow", "mixed_bfloat16")]["step_ms"] / 1e3
    text = (docs / "benchmarks.md").read_text()
    assert f"{min(slower):.1f}–{max(slower):.1f}× slower" in text
    assert f"{min(jax):.2f}–{max(jax):.2f}× TensorFlow float32" in text
    assert f"bfloat16 takes {step:.0f} s" in text
    assert data["machine"]["cpu_flags"] == ["avx2", "fma"] and "AVX2-only AMD EPYC" in text
