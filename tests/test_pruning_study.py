"""The Fig. 7 study's reading (tools/pruning_study.py) on hand-made records: what it computes
from the runs, and when it says a difference is beyond the seeds' spread. No training here;
the study itself runs in tests/test_studies.py (slow)."""

from __future__ import annotations

import pytest

from tools import pruning_study as ps


def _record(plain_accuracy: dict, seeds=(0, 1, 2)) -> dict:
    """One family, budget 0.5: residual models at 90/88% (unpruned/pruned) and 1,000/2,000
    images/s; plain at 90% and 900 images/s unpruned, pruned at the given accuracy per seed and
    2,500 images/s."""
    protocol = {**ps.QUICK, "seeds": list(seeds), "budgets": [0.5]}
    runs, speed = {}, {}
    for seed in seeds:
        key = f"ResNet-20|seed={seed}"
        models = {
            "residual": ("residual", None, 0.90, 1000.0),
            "plain": ("plain", None, 0.90, 900.0),
            "residual@0.5": ("residual", 0.5, 0.88, 2000.0),
            "plain@0.5": ("plain", 0.5, plain_accuracy[seed], 2500.0),
        }
        runs[key] = {
            "family": "ResNet-20",
            "seed": seed,
            "train_images": 1000,
            "test_images": 1000,
            "seconds": 60.0,
            "models": {
                name: {
                    "kind": kind,
                    "budget": b,
                    "macs": 100 if b is None else 50,
                    "params": 10,
                    "accuracy": a,
                }
                for name, (kind, b, a, _) in models.items()
            },
        }
        for name, (*_, ips) in models.items():
            speed[f"{key}#{name}"] = [ips, ips * 0.9, ips * 1.1]
    machine = {"cpu": "test CPU", "usable_cores": 2, "tensorflow": "x"}
    timing = {"engine": "test", "batch_size": 128, "iters": 1, "repeats": 3}
    timing.update(images_per_s=speed, machine=machine, load_average=None)
    return {"protocol": protocol, "runs": runs, "timing": timing}


def test_a_difference_every_seed_agrees_on_and_above_the_spread_is_resolved():
    record = _record({0: 0.90, 1: 0.91, 2: 0.905})
    (unpruned, half) = ps.comparisons(record)
    assert unpruned["budget"] is None and half["budget"] == 0.5
    assert half["same_budget"] == pytest.approx([2.0, 3.0, 2.5])
    assert half["speed_ratio"] == pytest.approx([1.25] * 3)
    # Each seed's plain curve at the pruned residual's 2,000 images/s: 1,100/1,600 of the way
    # from (900, 90%) to (2,500, its pruned accuracy); minus the residual's 88%.
    assert half["same_speed"] == pytest.approx([2.0, 2.6875, 2.34375])
    text = ps.reading(record)
    assert "+2.50 points (seeds: +2.00, +3.00, +2.50; spread 0.50): higher, beyond" in text
    assert "interpolated at the pruned residual model's images/s): +2.34 points (seeds: " in text
    assert "+2.00, +2.69, +2.34): higher, beyond the seeds' spread." in text


def test_seeds_that_disagree_in_sign_are_not_resolved():
    record = _record({0: 0.87, 1: 0.90, 2: 0.89})
    assert "not distinguishable from the seeds' spread" in ps.reading(record)
    assert not ps.resolved([-1.0, 2.0, 1.0], spread=0.1)
    assert not ps.resolved([3.0], spread=0.1)  # one seed has no spread to beat
    assert not ps.resolved([1.0, 1.2], spread=1.5)  # same sign, inside the spread
    assert ps.resolved([-1.0, -1.2], spread=0.5)


def test_a_residual_model_outside_the_plain_curve_has_no_equal_speed_point():
    record = _record({0: 0.90, 1: 0.91, 2: 0.905})
    for key in record["runs"]:
        record["timing"]["images_per_s"][f"{key}#residual@0.5"] = [3000.0, 2900.0, 3100.0]
    half = ps.comparisons(record)[1]
    assert half["same_speed"] == [None, None, None]
    assert "Its speed is outside every seed's plain curve: no equal-speed point." in ps.reading(
        record
    )


def test_the_table_lists_both_forms_at_every_budget_with_the_protocol():
    record = _record({0: 0.90, 1: 0.91, 2: 0.905})
    text = ps.table(record)
    assert "| ResNet-20 | 0.5 | plain | 0.50 | 10 | 90.50% ± 0.50 | 2,500 ± 0 |" in text
    assert "| ResNet-20 | – | residual | 1.00 | 10 | 90.00% ± 0.00 | 1,000 ± 0 |" in text
    assert "seeds 0, 1, 2; tested on 1,000 test images (one image is 0.10 points)" in text


def test_a_budget_a_form_could_not_reach_is_said():
    record = _record({0: 0.90, 1: 0.91, 2: 0.905})
    record["runs"]["ResNet-20|seed=1"]["models"]["plain@0.5"]["macs"] = 78  # the residual: 100
    assert (
        "(Off budget: the plain models reached 0.50×, 0.78×, 0.50× (by seed), not 0.5×.)"
        in ps.reading(record)
    )
    assert "Off budget" not in ps.reading(_record({0: 0.90, 1: 0.91, 2: 0.905}))


def test_full_protocol_uses_every_image_and_stops_between_runs(tmp_path, capsys):
    """``--protocol full --max-minutes 0``: the GPU run's stop before any run (nothing trained,
    the docs left alone, the JSON ready to resume); its protocol is the whole training split."""
    full = ps.PROTOCOLS["full"]
    assert full["train_examples"] is None and full["epochs"] > ps.CPU["epochs"]
    assert ps.run_key("ResNet-20", 0, full) != ps.run_key("ResNet-20", 0, ps.CPU)
    docs = tmp_path / "docs"
    argv = ["--protocol", "full", "--max-minutes", "0", "--docs", str(docs)]
    argv += ["--models", str(tmp_path / "models"), "--data-dir", str(tmp_path / "nowhere")]
    assert ps.main(argv) == 0
    out = capsys.readouterr().out
    assert "--max-minutes 0 reached: 6 runs left" in out and "docs wait" in out
    assert not (docs / "pruning.md").exists() and not (tmp_path / "models").exists()
