"""RMNet's Fig. 7 on Fashion-MNIST: a residual network and its plain form, pruned to the same
MACs budgets by the same graph method, compared at measured speed over several seeds.

``python -m tools.pruning_study`` (the ``cpu`` protocol: ResNet-20 and DMRNet-14, 3 seeds, about
an hour and a half on 2 CPU cores) trains each network once per seed with the extra BN on the
residual path (``prune.with_skip_bn``) and sparsity training (``prune.BNSparsity``), converts it
(``to_plain(fuse_bn=False)``), then prunes (a) the residual network as it is -- every channel a
shortcut ties goes with the channels it is tied to -- and (b) its plain form, each with
``prune.prune_to_budget`` to the same fractions of the *residual* network's MACs (same cuts, same
fine-tuning). Every model is tested on the whole test split and saved with BN folded; once all
runs are done, every saved model is timed, interleaved, under one engine (Keras on TensorFlow,
float32, batch 128). Runs are stored one by one in the JSON, so an interrupted study resumes;
``--table-only`` redraws the table, the reading and the plot from the JSON.

``--protocol digits`` runs the same on the bundled digits (one image is 0.28 points: a smoke
test of the method, not a result), ``--quick`` a smoke run on 256 images, ``--protocol full``
all 60,000 training images for 30 epochs (a lent GPU: ``KERAS_BACKEND=jax``, ``--data-dir``
for the copied IDX files, ``--max-minutes`` to stop between runs and resume in a later
session); all three write to a scratch copy of the docs (``runs/quick-docs``) unless
``--docs`` names one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

# label → (builder in keras_dmr, its options)
FAMILIES: dict[str, tuple[str, dict]] = {
    "ResNet-20": ("ResNet", {"depth": 20}),
    "DMRNet-14": ("DMRNet", {"depth": 14}),
}
KINDS = ("residual", "plain")
# Fashion-MNIST sized for 2 CPU cores: the first 10,000 training images (the demo's), 8 epochs
# (ResNet-20 reaches 87.5% on the 10,000 test images, mean of 3 seeds), sparsity training that
# may shrink a scale by 0.95 in all over the run (the demo's), then each budget reached in 3
# cuts with one fine-tuning epoch (156 steps) after each, every layer a multiple of 8 filters.
CPU = {
    "name": "cpu",
    "dataset": "fashion_mnist",
    "train_examples": 10_000,
    "test_examples": None,  # the whole test split
    "epochs": 8,
    "batch_size": 64,
    "learning_rate": 0.1,
    "sparsity_budget": 0.95,
    "budgets": [0.5, 0.3],  # of the residual network's MACs
    "prune_steps": 3,
    "finetune_epochs": 1,
    "finetune_learning_rate": 0.005,
    "round_to": 8,
    "seeds": [0, 1, 2],
    "timing": {"batch_size": 128, "warmup": 2, "iters": 3, "repeats": 7},
}
DIGITS = {
    **CPU,
    "name": "digits",
    "dataset": "digits",
    "train_examples": None,
    "epochs": 12,
    "finetune_epochs": 4,
    "seeds": [0],
}
QUICK = {
    **CPU,
    "name": "quick",
    "train_examples": 256,
    "test_examples": 256,
    "epochs": 1,
    "budgets": [0.5],
    "prune_steps": 1,
    "seeds": [0],
    "timing": {"batch_size": 32, "warmup": 1, "iters": 1, "repeats": 3},
}
# All 60,000 training images for 30 epochs: for a lent GPU (KERAS_BACKEND=jax needs no
# TensorFlow); its timing is that machine's, under its backend.
FULL = {**CPU, "name": "full", "train_examples": None, "epochs": 30}
PROTOCOLS = {"cpu": CPU, "digits": DIGITS, "quick": QUICK, "full": FULL}
# (JSON under DOCS/data, plot, generated section of DOCS/pruning.md), whatever the protocol
OUTPUT = ("pruning.json", "pruning.png", "pruning-results")
MODELS_DIR = Path("runs") / "pruning_study"
REFERENCE = "residual without shortcut scales"
BACKEND_NAMES = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _log(message: str) -> None:
    print(message, flush=True)


def run_key(family: str, seed: int, protocol: dict) -> str:
    keys = ("dataset", "train_examples", "test_examples", "epochs", "sparsity_budget")
    keys += ("prune_steps", "finetune_epochs", "finetune_learning_rate", "round_to")
    return f"{family}|seed={seed}|" + ",".join(f"{k}={protocol[k]}" for k in keys)


def model_name(kind: str, budget: float | None) -> str:
    return kind if budget is None else f"{kind}@{budget:g}"


def _pipelines(protocol: dict, seed: int, data_dir: str | None = None) -> tuple:
    from tools.fmnist_study import pipelines

    # Whole batches only: TensorFlow 2.21's oneDNN CPU kernels crash (segfault / double free)
    # training some pruned functional ResNets on the short last batch.
    return pipelines(protocol, seed, data_dir, drop_remainder=True)


def _entry(model, kind: str, budget: float | None, test, path: Path) -> dict:
    """A deployable copy of ``model`` (BN folded) tested and saved; its record."""
    from keras_dmr import prune
    from keras_dmr.analysis.flops import count_flops
    from keras_dmr.utils.files import atomic_output

    deployed = prune.fuse_batchnorm(model)
    with atomic_output(path, suffix=".keras") as tmp:
        deployed.save(tmp)
    return {
        "kind": kind,
        "budget": budget,
        "macs": int(count_flops(deployed)),
        "params": int(deployed.count_params()),
        "accuracy": prune.accuracy(deployed, test),
        "file": str(path),
    }


def train_run(
    family: str, seed: int, protocol: dict, models_dir: Path, data_dir: str | None = None
) -> dict:
    """Train ``family`` with ``seed``, prune both forms to every budget; the run's record."""
    import keras

    import keras_dmr
    from keras_dmr import prune
    from keras_dmr.analysis.flops import count_flops
    from keras_dmr.convert import to_plain
    from keras_dmr.recipe import StepDecay, compile_with_recipe
    from keras_dmr.utils.timing import machine_description

    start = time.monotonic()
    builder, options = FAMILIES[family]
    keras.utils.set_random_seed(seed)
    train, test = _pipelines(protocol, seed, data_dir)
    images = sum(int(y.shape[0]) for _, y in train)
    factor = prune.sparsity_factor(
        protocol["sparsity_budget"], images, protocol["epochs"], protocol["batch_size"]
    )
    residual = prune.with_skip_bn(getattr(keras_dmr, builder)(compile=False, **options))
    compile_with_recipe(residual, learning_rate=protocol["learning_rate"])
    _log(
        f"{family}, seed {seed}: training {protocol['epochs']} epochs on {images:,} images, "
        f"sparsity factor {factor:.4g} ..."
    )
    residual.fit(
        train,
        epochs=protocol["epochs"],
        shuffle=False,
        verbose=0,
        callbacks=[StepDecay(), prune.BNSparsity(factor)],
    )
    trained_seconds = time.monotonic() - start
    scales = prune.bn_scales(residual)
    plain = to_plain(residual, fuse_bn=False)
    base_macs = count_flops(residual)
    folder = models_dir / f"{family}_seed{seed}"
    models = {
        "residual": _entry(residual, "residual", None, test, folder / "residual.keras"),
        "plain": _entry(plain, "plain", None, test, folder / "plain.keras"),
    }
    _log(
        f"  trained in {trained_seconds / 60:.1f} min: accuracy "
        f"{models['residual']['accuracy']:.4f}, {int(np.sum(scales == 0))} of {scales.size} "
        "scales 0"
    )
    for budget in protocol["budgets"]:
        for kind, source in (("residual", residual), ("plain", plain)):
            keras.utils.set_random_seed(seed)
            pruned = prune.prune_to_budget(
                source,
                train,
                macs=min(1.0, budget * base_macs / count_flops(source)),
                steps=protocol["prune_steps"],
                epochs=protocol["finetune_epochs"],
                learning_rate=protocol["finetune_learning_rate"],
                round_to=protocol["round_to"],
                log=lambda line: _log(f"    {line}"),
            )
            name = model_name(kind, budget)
            entry = _entry(pruned, kind, budget, test, folder / f"{name}.keras")
            entry["cuts"] = pruned.pruning_report["steps"]
            models[name] = entry
            _log(
                f"  {name:<14} {entry['macs'] / base_macs:.1%} of the residual MACs, "
                f"accuracy {entry['accuracy']:.4f}"
            )
    return {
        "family": family,
        "seed": seed,
        "protocol": protocol["name"],
        "train_images": images,
        "test_images": sum(int(y.shape[0]) for _, y in test),
        "sparsity_factor": factor,
        "trained_seconds": round(trained_seconds, 1),
        "scales": int(scales.size),
        "scales_zero": int(np.sum(scales == 0)),
        "conversion_error": plain.conversion_report["max_relative_error"],
        "models": models,
        "machine": machine_description(),
        "seconds": round(time.monotonic() - start, 1),
    }


def time_models(record: dict, protocol: dict) -> dict:
    """Every saved model of the protocol's runs timed under one engine, interleaved."""
    import keras

    import keras_dmr
    from keras_dmr import prune
    from keras_dmr.utils.timing import load_average, machine_description

    models = {}
    for key, run in record["runs"].items():
        for name, entry in run["models"].items():
            models[f"{key}#{name}"] = keras.saving.load_model(entry["file"], safe_mode=True)
    # What the shortcut scales of with_skip_bn cost the residual network once deployed (a
    # per-channel multiply on each shortcut): the same network built without them.
    for family in {run["family"] for run in record["runs"].values()}:
        builder, options = FAMILIES[family]
        built = getattr(keras_dmr, builder)(compile=False, **options)
        models[f"{family}#{REFERENCE}"] = prune.fuse_batchnorm(built)
    timing = protocol["timing"]
    _log(f"timing {len(models)} models, interleaved ...")
    speed = prune.throughput(models, spread=True, **timing)
    return {
        "engine": f"keras ({BACKEND_NAMES.get(keras.backend.backend(), keras.backend.backend())})"
        ", float32, BN folded",
        **timing,
        "images_per_s": {label: list(values) for label, values in speed.items()},
        "machine": machine_description(),
        "load_average": load_average(),
    }


def run(
    protocol: dict,
    path: Path,
    models_dir: Path = MODELS_DIR,
    *,
    data_dir: str | None = None,
    max_minutes: float | None = None,
) -> dict:
    """Every run of ``protocol`` not yet in ``path`` (written after each), then the timing.
    With ``max_minutes`` no run starts after that many minutes; the timing waits until every
    run is in (a later call resumes)."""
    from keras_dmr.utils.files import write_json

    started = time.monotonic()
    record = json.loads(path.read_text()) if path.exists() else {}
    if record.get("protocol") != protocol:
        if record.get("runs"):
            _log(f"{path} holds {len(record['runs'])} runs of another protocol: starting over")
        record = {"protocol": protocol, "runs": {}}
    todo = [
        (family, seed)
        for seed in protocol["seeds"]
        for family in FAMILIES
        if run_key(family, seed, protocol) not in record["runs"]
    ]
    _log(f"{len(todo)} of {len(FAMILIES) * len(protocol['seeds'])} runs to train")
    for done, (family, seed) in enumerate(todo):
        if max_minutes is not None and time.monotonic() - started > 60 * max_minutes:
            _log(f"--max-minutes {max_minutes:g} reached: {len(todo) - done} runs left")
            return record
        record["runs"][run_key(family, seed, protocol)] = train_run(
            family, seed, protocol, models_dir, data_dir
        )
        record.pop("timing", None)
        write_json(record, path)
    if "timing" not in record:
        record["timing"] = time_models(record, protocol)
        write_json(record, path)
    return record


# Reading the record ------------------------------------------------------------------------


def points(record: dict) -> list[dict]:
    """One row per (run, model) with its measured images/s."""
    speed = record["timing"]["images_per_s"]
    rows = []
    for key, run in record["runs"].items():
        base = run["models"]["residual"]["macs"]
        for name, entry in run["models"].items():
            median, slowest, fastest = speed[f"{key}#{name}"]
            rows.append(
                {
                    **entry,
                    "family": run["family"],
                    "seed": run["seed"],
                    "name": name,
                    "macs_ratio": entry["macs"] / base,
                    "images_per_s": median,
                    "images_per_s_range": [slowest, fastest],
                }
            )
    return rows


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _interpolate(x: float, xs: list[float], ys: list[float]) -> float | None:
    """``ys`` at ``x`` on the piecewise-linear curve through ``(xs, ys)``; None outside it."""
    order = np.argsort(xs)
    xs_sorted, ys_sorted = np.asarray(xs)[order], np.asarray(ys)[order]
    if not xs_sorted[0] <= x <= xs_sorted[-1]:
        return None
    return float(np.interp(x, xs_sorted, ys_sorted))


def comparisons(record: dict) -> list[dict]:
    """Per family and budget: both kinds over the seeds, and the plain-minus-residual accuracy
    paired by seed, at the same budget and at the same measured speed (the plain curve of the
    same seed, unpruned and pruned, interpolated at the residual model's images/s)."""
    rows = points(record)
    out = []
    for family in FAMILIES:
        mine = [r for r in rows if r["family"] == family]
        if not mine:
            continue
        seeds = sorted({r["seed"] for r in mine})
        for budget in [None, *record["protocol"]["budgets"]]:
            by = {(r["kind"], r["seed"]): r for r in mine if r["budget"] == budget}
            entry = {"family": family, "budget": budget, "seeds": seeds}
            for kind in KINDS:
                picked = [by[kind, s] for s in seeds]
                entry[kind] = {
                    "accuracy": _mean_sd([r["accuracy"] for r in picked]),
                    "images_per_s": _mean_sd([r["images_per_s"] for r in picked]),
                    "macs_ratio": statistics.fmean(r["macs_ratio"] for r in picked),
                    "macs_ratios": [r["macs_ratio"] for r in picked],
                    "params": statistics.fmean(r["params"] for r in picked),
                }
            entry["same_budget"] = [
                (by["plain", s]["accuracy"] - by["residual", s]["accuracy"]) * 100 for s in seeds
            ]
            entry["speed_ratio"] = [
                by["plain", s]["images_per_s"] / by["residual", s]["images_per_s"] for s in seeds
            ]
            equal_speed = []
            for s in seeds:  # the plain curve of the seed at the residual model's speed
                curve = [r for r in mine if r["seed"] == s and r["kind"] == "plain"]
                at = _interpolate(
                    by["residual", s]["images_per_s"],
                    [r["images_per_s"] for r in curve],
                    [r["accuracy"] for r in curve],
                )
                equal_speed.append(
                    None if at is None else (at - by["residual", s]["accuracy"]) * 100
                )
            entry["same_speed"] = equal_speed
            out.append(entry)
    return out


def resolved(differences: list[float], spread: float) -> bool:
    """Beyond the seeds' spread: every seed's paired difference has the same sign and their
    mean exceeds the larger standard deviation of the two kinds' accuracies over the seeds."""
    if len(differences) < 2 or any(d is None for d in differences):
        return False
    same_sign = all(d > 0 for d in differences) or all(d < 0 for d in differences)
    return same_sign and abs(statistics.fmean(differences)) > spread


def _points_text(values: list[float | None]) -> str:
    return ", ".join("–" if v is None else f"{v:+.2f}" for v in values)


def reading(record: dict) -> str:
    """What the runs say, computed from them (never written by hand)."""
    lines = []
    for c in comparisons(record):
        if c["budget"] is None:
            continue
        spread = max(c["residual"]["accuracy"][1], c["plain"]["accuracy"][1]) * 100
        same = c["same_budget"]
        speed = statistics.fmean(c["speed_ratio"])
        verdict = (
            ("higher" if statistics.fmean(same) > 0 else "lower") + ", beyond the seeds' spread"
            if resolved(same, spread)
            else "not distinguishable from the seeds' spread"
        )
        line = (
            f"- **{c['family']} at {c['budget']:g}× the residual MACs**: the pruned plain model "
            f"runs {speed:.2f}× as fast as the pruned residual one (mean over seeds) and its "
            f"accuracy is {statistics.fmean(same):+.2f} points (seeds: {_points_text(same)}; "
            f"spread {spread:.2f}): {verdict}."
        )
        missed = [
            f"the {kind} models reached "
            + ", ".join(f"{r:.2f}×" for r in c[kind]["macs_ratios"])
            + f" (by seed), not {c['budget']:g}×"
            for kind in KINDS
            if any(abs(r - c["budget"]) > 0.1 * c["budget"] for r in c[kind]["macs_ratios"])
        ]
        if missed:
            line += f" (Off budget: {'; '.join(missed)}.)"
        at_speed = [d for d in c["same_speed"] if d is not None]
        if at_speed:
            verdict = (
                ("higher" if statistics.fmean(at_speed) > 0 else "lower")
                + ", beyond the seeds' spread"
                if resolved(c["same_speed"], spread)
                else "not distinguishable from the seeds' spread"
            )
            line += (
                " **At equal speed** (the plain curve of each seed interpolated at the pruned "
                f"residual model's images/s): {statistics.fmean(at_speed):+.2f} points (seeds: "
                f"{_points_text(c['same_speed'])}"
                + (
                    "; –: outside the plain curve's range"
                    if len(at_speed) < len(c["same_speed"])
                    else ""
                )
                + f"): {verdict}."
            )
        else:
            line += " Its speed is outside every seed's plain curve: no equal-speed point."
        lines.append(line)
    return "\n".join(lines)


def _pct(mean_sd: tuple[float, float]) -> str:
    return f"{mean_sd[0]:.2%} ± {mean_sd[1] * 100:.2f}"


def table(record: dict) -> str:
    """The results section of docs/pruning.md: table, computed reading, protocol."""
    lines = [
        "| network | MACs budget | model | MACs (× residual) | parameters | test accuracy "
        "(mean ± sd over seeds) | images/s (mean ± sd) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for c in comparisons(record):
        for kind in KINDS:
            k = c[kind]
            budget = "–" if c["budget"] is None else f"{c['budget']:g}"
            speed, sd = k["images_per_s"]
            lines.append(
                f"| {c['family']} | {budget} | {kind} | {k['macs_ratio']:.2f} | "
                f"{k['params']:,.0f} | {_pct(k['accuracy'])} | {speed:,.0f} ± {sd:,.0f} |"
            )
    protocol, timing = record["protocol"], record["timing"]
    runs = list(record["runs"].values())
    machine, load = timing["machine"], timing.get("load_average")
    speed = timing["images_per_s"]
    costs = []
    for family in FAMILIES:
        if f"{family}#{REFERENCE}" not in speed:
            continue
        with_scales = [
            speed[f"{key}#residual"][0]
            for key, run in record["runs"].items()
            if run["family"] == family
        ]
        without = speed[f"{family}#{REFERENCE}"][0]
        costs.append(
            f"{family} {without:,.0f} images/s against {statistics.fmean(with_scales):,.0f} "
            "with them"
        )
    lines += ["", reading(record)]
    if costs:
        lines += [
            "",
            "The residual models keep `with_skip_bn`'s shortcut scale (a per-channel multiply "
            "on each shortcut) once deployed; the same networks built without it, timed in the "
            f"same run: {'; '.join(costs)}.",
        ]
    lines += [
        "",
        f"Protocol `{protocol['name']}`: {', '.join(FAMILIES)} trained with `with_skip_bn` for "
        f"{_plural(protocol['epochs'], 'epoch')} on {runs[0]['train_images']:,} "
        f"{protocol['dataset']} training images (recipe, lr {protocol['learning_rate']}, batch "
        f"{protocol['batch_size']}) with `BNSparsity` (proximal, a factor that shrinks a scale "
        f"by at most {protocol['sparsity_budget']:g} over the run), seeds "
        f"{', '.join(str(s) for s in protocol['seeds'])}; tested on {runs[0]['test_images']:,} "
        f"test images (one image is {100 / runs[0]['test_images']:.2f} points). Each budget "
        f"reached by `prune.prune_to_budget` in {_plural(protocol['prune_steps'], 'cut')}, "
        "BN statistics re-estimated and "
        f"{_plural(protocol['finetune_epochs'], 'fine-tuning epoch')} at lr "
        f"{protocol['finetune_learning_rate']:g} after each, every layer a multiple of "
        f"{protocol['round_to']} filters, BN criterion. MACs and parameters with BN folded. "
        f"Throughput: {timing['engine']}, batch {timing['batch_size']}, median of "
        f"{timing['repeats']} repeats of {timing['iters']} calls, all "
        f"{len(timing['images_per_s'])} models interleaved, on {machine['cpu']} "
        f"({machine['usable_cores']} usable cores, "
        f"TensorFlow {machine.get('tensorflow')}"
        + (f", load average {load[0]:.1f} while timing" if load else "")
        + f"). Training and pruning: {sum(r['seconds'] for r in runs) / 60:.0f} min in all.",
    ]
    return "\n".join(lines)


def plot(record: dict, path: str | Path) -> None:
    """Fig. 7: test accuracy against measured throughput, one panel per network; each seed's
    models small, the mean over seeds large with its standard deviations as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keras_dmr.utils.files import save_figure

    families = [f for f in FAMILIES if any(r["family"] == f for r in record["runs"].values())]
    fig, axes = plt.subplots(1, len(families), figsize=(5.6 * len(families), 4.4), squeeze=False)
    styles = {"residual": ("tab:blue", "o"), "plain": ("tab:red", "s")}
    rows = points(record)
    by_family = {}
    for c in comparisons(record):
        by_family.setdefault(c["family"], []).append(c)
    for ax, family in zip(axes[0], families, strict=True):
        for kind in KINDS:
            color, marker = styles[kind]
            mine = [r for r in rows if r["family"] == family and r["kind"] == kind]
            ax.scatter(
                [r["images_per_s"] for r in mine],
                [r["accuracy"] * 100 for r in mine],
                s=12,
                marker=marker,
                color=color,
                alpha=0.35,
            )
            means = by_family[family]
            xs = [c[kind]["images_per_s"][0] for c in means]
            ys = [c[kind]["accuracy"][0] * 100 for c in means]
            ax.errorbar(
                xs,
                ys,
                xerr=[c[kind]["images_per_s"][1] for c in means],
                yerr=[c[kind]["accuracy"][1] * 100 for c in means],
                marker=marker,
                color=color,
                capsize=3,
                label=f"{kind} (unpruned, then each budget)",
            )
            for c, x, y in zip(means, xs, ys, strict=True):
                label = "unpruned" if c["budget"] is None else f"{c['budget']:g}×"
                ax.annotate(
                    label,
                    (x, y),
                    textcoords="offset points",
                    xytext=(5, -10),
                    fontsize=7,
                    color=color,
                )
        ax.set_title(family)
        ax.set_xlabel(
            f"images/s ({record['timing']['engine']}, batch {record['timing']['batch_size']})"
        )
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    seeds = len(record["protocol"]["seeds"])
    fig.suptitle(
        f"Pruned to the same MACs budgets: residual vs plain form on "
        f"{record['protocol']['dataset']} ({seeds} seed{'s' if seeds > 1 else ''}; faint: "
        "each seed)",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def write_docs(record: dict, docs: Path) -> None:
    from keras_dmr.utils.files import write_json, write_text
    from keras_dmr.utils.markdown import replace_section

    json_name, png, section = OUTPUT
    write_json(record, docs / "data" / json_name)
    plot(record, docs / png)
    md = docs / "pruning.md"
    write_text(replace_section(md.read_text(), section, table(record)), md)


def main(argv=None) -> int:
    from tools.fmnist_study import add_resume_arguments, quick_docs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--protocol", choices=tuple(PROTOCOLS), default="cpu", help="(default: %(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="the quick protocol (smoke run)")
    parser.add_argument(
        "--docs",
        type=Path,
        help="the docs to regenerate (default: docs for the cpu protocol, else "
        "runs/quick-docs, a copy)",
    )
    parser.add_argument(
        "--models", type=Path, default=MODELS_DIR, help="where the pruned models are saved"
    )
    add_resume_arguments(parser)
    parser.add_argument(
        "--table-only", action="store_true", help="regenerate table and plot from the JSON"
    )
    args = parser.parse_args(argv)
    protocol = PROTOCOLS["quick" if args.quick else args.protocol]
    docs = args.docs or (Path("docs") if protocol is CPU else quick_docs())
    path = docs / "data" / OUTPUT[0]
    if args.table_only:
        record = json.loads(path.read_text())
    else:
        record = run(
            protocol,
            path,
            args.models / protocol["name"],
            data_dir=args.data_dir,
            max_minutes=args.max_minutes,
        )
        if "timing" not in record:
            _log(f"{len(record['runs'])} runs in {path}; the docs wait for the rest")
            return 0
    write_docs(record, docs)
    _log(f"wrote {docs / 'pruning.md'} and its plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
