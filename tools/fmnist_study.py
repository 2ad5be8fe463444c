"""Training runs on Fashion-MNIST shared by the Table 2 and Table 7 studies.

One run = one model trained once with the paper's recipe on a fixed protocol and seed, then
evaluated on the test split as trained (residual) and after ``to_plain`` (plain), with every
prediction compared. Runs are stored in one JSON (``docs/data/fashion_mnist_runs.json``) keyed by
model, seed and protocol, written after each run: a finished run is never trained again, so an
interrupted study resumes, and Table 7's merge-and-run row reuses Table 2's DMRNet-14 runs.

The protocol (:data:`PROTOCOL`) fits the machine this project runs on: 2 CPU cores without
AVX-512, where a 0.35M-parameter CIFAR network trains at about 11 ms per image (≈ 650 s per
epoch of the 60,000 training images). The paper's 400 epochs of 50,000 images are out of reach;
the default trains on the first 2,000 training images (stored order, ~200 per class) for
6 epochs and tests on all 10,000 test images: about 3–4 minutes per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

PROTOCOL = {
    "dataset": "fashion_mnist",
    "train_examples": 2000,
    "test_examples": None,  # the whole test split
    "epochs": 6,
    "batch_size": 64,
    "learning_rate": 0.1,
    "seeds": [0, 1, 2],
}
QUICK = {**PROTOCOL, "train_examples": 256, "test_examples": 512, "epochs": 1, "seeds": [0]}
# For a machine with a GPU (JAX, no TensorFlow needed): all 60,000 training images, the recipe
# over 40 epochs (learning-rate steps at epochs 20, 30 and 35), 3 seeds. About 3 to 5 minutes a
# run on one H100 (estimated from the throughput of the benchmarks, not yet measured).
FULL = {**PROTOCOL, "train_examples": None, "epochs": 40}
PROTOCOLS = {"quick": QUICK, "cpu": PROTOCOL, "full": FULL}
RUNS_JSON = Path("docs/data/fashion_mnist_runs.json")

# label → (builder name in keras_dmr, keyword arguments)
MODELS: dict[str, tuple[str, dict]] = {
    "DMRNet-14": ("DMRNet", {"depth": 14}),
    "DVANet-14": ("DVANet", {"depth": 14}),
    "ResNet-26": ("ResNet", {"depth": 26}),
    "Wide ResNet-14 (23/46/92)": ("ResNet", {"depth": 14, "widths": [23, 46, 92]}),
    "Identity-14, shared conv0/classifier": ("DMRNet", {"depth": 14, "mapping": "identity"}),
    "Identity-14, separate conv0/classifier": (
        "DMRNet",
        {"depth": 14, "mapping": "identity", "share_stem_and_head": False},
    ),
}


def _log(message: str) -> None:
    print(message, flush=True)


def protocol_key(protocol: dict) -> str:
    keys = ("dataset", "train_examples", "test_examples", "epochs", "batch_size", "learning_rate")
    return ",".join(f"{k}={protocol[k]}" for k in keys)


def run_key(label: str, seed: int, protocol: dict) -> str:
    return f"{label}|seed={seed}|{protocol_key(protocol)}"


def read_runs(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _logits(model, test) -> tuple[np.ndarray, np.ndarray]:
    outputs, labels = [], []
    for images, y in test:
        outputs.append(np.asarray(model(images, training=False)))
        labels.append(np.asarray(y))
    return np.concatenate(outputs), np.concatenate(labels)


def compare_forms(residual: np.ndarray, plain: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy of both forms and every prediction on which they differ, with its logit gap
    (the residual model's top-1 minus its runner-up logit: a tie broken by rounding has ~0)."""
    pr, pp = residual.argmax(-1), plain.argmax(-1)
    top2 = np.sort(residual, -1)[:, -2:]
    differing = np.flatnonzero(pr != pp)
    return {
        "residual_accuracy": float(np.mean(pr == labels)),
        "plain_accuracy": float(np.mean(pp == labels)),
        "test_images": int(len(labels)),
        "differing_predictions": [
            {"image": int(i), "logit_gap": float(top2[i, 1] - top2[i, 0])} for i in differing
        ],
        "max_abs_logit_difference": float(np.max(np.abs(residual - plain))),
    }


def pipelines(
    protocol: dict, seed: int, data_dir: str | None = None, *, drop_remainder: bool = False
) -> tuple:
    """A protocol's training batches (shuffled by ``seed``) and test batches of 500."""
    from keras_dmr import data

    train = data.load(
        protocol["dataset"],
        "train",
        batch_size=protocol["batch_size"],
        seed=seed,
        drop_remainder=drop_remainder,
        take=protocol["train_examples"],
        data_dir=data_dir,
    )
    test = data.load(
        protocol["dataset"],
        "test",
        batch_size=500,
        take=protocol["test_examples"],
        data_dir=data_dir,
    )
    return train, test


def train_run(label: str, seed: int, protocol: dict, data_dir: str | None = None) -> dict:
    """Train ``MODELS[label]`` with ``seed``; evaluate the residual and the plain form."""
    import keras

    import keras_dmr
    from keras_dmr.convert import ConversionError, to_plain
    from keras_dmr.recipe import StepDecay, compile_with_recipe
    from keras_dmr.utils.timing import load_average, machine_description

    builder, kwargs = MODELS[label]
    keras.utils.set_random_seed(seed)
    train, test = pipelines(protocol, seed, data_dir)
    model = getattr(keras_dmr, builder)(compile=False, **kwargs)
    compile_with_recipe(model, learning_rate=protocol["learning_rate"])
    start = time.monotonic()
    history = model.fit(
        train, epochs=protocol["epochs"], shuffle=False, verbose=0, callbacks=[StepDecay()]
    )
    train_seconds = time.monotonic() - start
    residual, labels = _logits(model, test)
    record = {
        "model": label,
        "builder": builder,
        "kwargs": kwargs,
        "params": int(model.count_params()),
        "seed": seed,
        "protocol": {k: v for k, v in protocol.items() if k != "seeds"},
        "train_loss": [round(float(v), 5) for v in history.history["loss"]],
        "train_seconds": round(train_seconds, 1),
        "machine": machine_description(),
        "load_average": load_average(),
    }
    try:
        plain = to_plain(model)
    except ConversionError as err:  # recorded, never hidden: the table shows the refusal
        record.update(residual_accuracy=float(np.mean(residual.argmax(-1) == labels)))
        record["plain"] = f"refused: {err}"
    else:
        record.update(compare_forms(residual, _logits(plain, test)[0], labels))
        record["plain_params"] = int(plain.count_params())
        record["conversion_error"] = plain.conversion_report["max_relative_error"]
    record["test_accuracy"] = record["residual_accuracy"]
    record["wall_seconds"] = round(time.monotonic() - start, 1)
    return record


def run_all(
    labels: list[str],
    protocol: dict,
    path: Path,
    data_dir: str | None = None,
    max_minutes: float | None = None,
) -> dict:
    """Every (label, seed) run not yet in ``path``, in seed-major order (a partial study
    still has every model once); each result is written as soon as it finishes. With
    ``max_minutes``, no run starts after that many minutes (a device session's limit): the
    next call resumes."""
    from keras_dmr.utils.files import write_json

    runs = read_runs(path)
    todo = [
        (label, seed)
        for seed in protocol["seeds"]
        for label in labels
        if run_key(label, seed, protocol) not in runs
    ]
    _log(f"{len(todo)} of {len(labels) * len(protocol['seeds'])} runs to train → {path}")
    start = time.monotonic()
    for n, (label, seed) in enumerate(todo, 1):
        if max_minutes is not None and time.monotonic() - start > 60 * max_minutes:
            _log(f"stopping after {max_minutes:g} minutes: {len(todo) - n + 1} runs left")
            break
        _log(f"[{n}/{len(todo)}] {label}, seed {seed} ...")
        record = train_run(label, seed, protocol, data_dir)
        runs = read_runs(path)  # another study may have written meanwhile
        runs[run_key(label, seed, protocol)] = record
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(runs, path)
        _log(
            f"    test accuracy {record['residual_accuracy']:.4f} (plain "
            f"{record.get('plain_accuracy', float('nan')):.4f}), {record['wall_seconds']:.0f} s"
        )
    return runs


def select(runs: dict, labels: list[str], protocol: dict) -> dict[str, list[dict]]:
    """The finished runs of each label under ``protocol``, in seed order."""
    return {
        label: [
            runs[run_key(label, s, protocol)]
            for s in protocol["seeds"]
            if run_key(label, s, protocol) in runs
        ]
        for label in labels
    }


def error_stats(records: list[dict]) -> tuple[float, float]:
    errors = [100 * (1 - r["test_accuracy"]) for r in records]
    return statistics.mean(errors), statistics.stdev(errors) if len(errors) > 1 else 0.0


def error_table(chosen: dict[str, list[dict]], paper: dict[str, str]) -> str:
    lines = [
        "| model | parameters | paper (CIFAR-10 error) | test error here, mean ± std (%) "
        "| per seed (%) | train time per run |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for label, records in chosen.items():
        if not records:
            lines.append(f"| {label} | – | {paper.get(label, '–')} | not run yet | – | – |")
            continue
        mean, std = error_stats(records)
        seeds = ", ".join(f"{100 * (1 - r['test_accuracy']):.2f}" for r in records)
        minutes = statistics.median(r["train_seconds"] for r in records) / 60
        lines.append(
            f"| {label} | {records[0]['params'] / 1e6:.3f}M | {paper.get(label, '–')} | "
            f"{mean:.2f} ± {std:.2f} (n={len(records)}) | {seeds} | {minutes:.1f} min |"
        )
    return "\n".join(lines)


def ordering(chosen: dict[str, list[dict]], claim: list[str]) -> str:
    """Whether the measured mean errors follow ``claim`` (best first), with the gaps in std."""
    have = [label for label in claim if chosen.get(label)]
    if len(have) < len(claim):
        return "Not every model has run yet: no ordering is claimed."
    stats = {label: error_stats(chosen[label]) for label in claim}
    holds = all(stats[a][0] <= stats[b][0] for a, b in zip(claim, claim[1:], strict=False))
    measured = sorted(claim, key=lambda label: stats[label][0])
    gaps = []
    for a, b in zip(claim, claim[1:], strict=False):
        (ma, sa), (mb, sb) = stats[a], stats[b]
        pooled = ((sa**2 + sb**2) / 2) ** 0.5
        gaps.append(
            f"{a} − {b}: {ma - mb:+.2f} points"
            + (f" ({(ma - mb) / pooled:+.1f} pooled std)" if pooled else "")
        )
    verdict = "holds" if holds else "does **not** hold"
    return (
        f"The paper's ordering ({' ≤ '.join(claim)} in error) {verdict} here; measured order, "
        f"best first: {', '.join(measured)}. Differences of the means: {'; '.join(gaps)}."
    )


def trained_labels(runs: dict, protocol: dict) -> list[str]:
    """Every model label with a run under ``protocol``, in the order the runs were recorded
    (the runs JSON is shared by the studies, so this spans all of them)."""
    suffix = f"|{protocol_key(protocol)}"
    labels = [key.split("|seed=")[0] for key in runs if key.endswith(suffix)]
    return list(dict.fromkeys(labels))


def conversion_section(runs: dict, protocol: dict) -> str:
    """The residual-against-plain section of docs/studies.md: every study's trained models."""
    return conversion_table(select(runs, trained_labels(runs, protocol), protocol))


def conversion_table(chosen: dict[str, list[dict]]) -> str:
    """Residual against plain accuracy of every trained run, differing predictions explained."""
    lines = [
        "| model | seed | residual accuracy | plain accuracy | differing predictions "
        "(residual logit gap) | max logit difference |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for label, records in chosen.items():
        for r in records:
            if "plain_accuracy" not in r:
                lines.append(
                    f"| {label} | {r['seed']} | {r['residual_accuracy']:.4f} | "
                    f"{r['plain']} | – | – |"
                )
                continue
            diff = r["differing_predictions"]
            text = (
                "none"
                if not diff
                else ", ".join(f"#{d['image']} ({d['logit_gap']:.1e})" for d in diff)
            )
            lines.append(
                f"| {label} | {r['seed']} | {r['residual_accuracy']:.4f} | "
                f"{r['plain_accuracy']:.4f} | {text} | {r['max_abs_logit_difference']:.1e} |"
            )
    return "\n".join(lines)


def protocol_text(protocol: dict, records: list[dict]) -> str:
    machine = records[0]["machine"] if records else None
    where = (
        f" on {machine['cpu']} ({machine['usable_cores']} usable cores, TensorFlow "
        f"{machine['tensorflow']}, Keras {machine['keras']})"
        if machine
        else ""
    )
    total = sum(r["wall_seconds"] for r in records) / 60
    test = protocol["test_examples"] or "all 10,000"
    train = (
        f"the first {protocol['train_examples']:,} training images (stored order)"
        if protocol["train_examples"]
        else "all training images"
    )
    return (
        f"Protocol: {protocol['dataset']}, {train}, {protocol['epochs']} epochs, batch "
        f"{protocol['batch_size']}, "
        f"the paper's recipe (SGD Nesterov 0.9, lr {protocol['learning_rate']} ÷10 at 1/2, 3/4, "
        f"7/8 of the epochs, L2 1e-4, pad-4 crop + flip), seeds "
        f"{', '.join(map(str, protocol['seeds']))}; test error on {test} test images; "
        f"trained{where}; {len(records)} runs, {total:.0f} min in all."
    )


def study_section(
    runs: dict, labels: list[str], paper: dict, claim: list[str], protocol: dict
) -> str:
    """A study's table, the verdict on the paper's ordering and the protocol, from the runs."""
    chosen = select(runs, labels, protocol)
    records = [r for rs in chosen.values() for r in rs]
    return "\n\n".join(
        [error_table(chosen, paper), ordering(chosen, claim), protocol_text(protocol, records)]
    )


def write_sections(page: Path, sections: dict[str, str]) -> None:
    from keras_dmr.utils.markdown import replace_section

    text = page.read_text()
    for name, content in sections.items():
        text = replace_section(text, name, content)
    page.write_text(text)


def bar_plot(chosen: dict[str, list[dict]], path: Path, title: str) -> None:
    """Mean test error with ± std bars, every seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, records in chosen.items() if records]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(labels) + 1.6))
    for i, label in enumerate(labels):
        mean, std = error_stats(chosen[label])
        ax.barh(i, mean, xerr=std, color="tab:blue", alpha=0.45, capsize=4)
        errors = [100 * (1 - r["test_accuracy"]) for r in chosen[label]]
        ax.scatter(errors, [i] * len(errors), color="black", s=14, zorder=3)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    low = min(min(100 * (1 - r["test_accuracy"]) for r in chosen[label]) for label in labels)
    ax.set_xlim(max(0.0, low - 2), None)
    ax.set_xlabel("test error (%): bar = mean ± std over seeds, dots = single seeds")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(
    argv: list[str] | None,
    *,
    description: str,
    labels: list[str],
    write_docs: Callable[[dict, dict, Path], None],
) -> int:
    """The command line both studies share: train what is missing, then regenerate the docs."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--docs",
        type=Path,
        help="the docs to regenerate (default: docs; with --quick: runs/quick-docs, a copy)",
    )
    parser.add_argument(
        "--runs", type=Path, help=f"the runs JSON (default: DOCS/data/{RUNS_JSON.name})"
    )
    parser.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        default="cpu",
        help="cpu: the first 2,000 training images for 6 epochs (2 CPU cores); full: all "
        "60,000 for 40 epochs (a GPU; KERAS_BACKEND=jax needs no TensorFlow); quick: a smoke "
        "run (default: cpu)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="--protocol quick: 256 training images, 1 epoch, 512 test images, one seed; "
        "never touches docs/",
    )
    add_resume_arguments(parser)
    parser.add_argument(
        "--table-only", action="store_true", help="regenerate tables and plot from the JSON"
    )
    args = parser.parse_args(argv)
    quick = args.quick or args.protocol == "quick"
    protocol = PROTOCOLS["quick" if quick else args.protocol]
    docs = args.docs or (quick_docs() if quick else Path("docs"))
    path = args.runs or docs / "data" / RUNS_JSON.name
    runs = (
        read_runs(path)
        if args.table_only
        else run_all(labels, protocol, path, args.data_dir, args.max_minutes)
    )
    write_docs(runs, protocol, docs)
    _log(f"regenerated {docs}")
    return 0


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` and ``--max-minutes``: what a study run in pieces on a lent GPU takes."""
    parser.add_argument(
        "--data-dir",
        help="where Fashion-MNIST's four IDX files are (default: Debian's location)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        help="start no run after this many minutes (the rest resumes next time)",
    )


def quick_docs(pages: tuple[str, ...] = ("studies.md", "pruning.md")) -> Path:
    """A scratch copy of the pages a study rewrites, so that smoke runs leave docs/ alone."""
    import shutil

    target = Path("runs") / "quick-docs"
    (target / "data").mkdir(parents=True, exist_ok=True)
    for page in pages:
        shutil.copyfile(Path("docs") / page, target / page)
    return target
