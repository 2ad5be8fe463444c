"""RMNet's Fig. 7 on Fashion-MNIST: network slimming of a ResNet against its plain RMNet.

``python -m tools.pruning_study`` (about 9 minutes on 2 CPU cores; ``--dataset digits``, the
quick path on the bundled data, a few minutes; ``--quick`` a smoke run) trains a ResNet
with the extra BN on the residual path and an L1 penalty on every BN scale, prunes (a) the
ResNet itself and (b) its RM plain form at the same thresholds, fine-tunes every pruned model
briefly, measures accuracy and throughput (BN folded, all models timed interleaved) and writes
``docs/data/pruning.json``, ``docs/pruning.png`` and the results table of ``docs/pruning.md``.
``--table-only`` rewrites the table and the plot from the JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

# The penalty a run applies grows with factor × learning rate × steps: 12 digits epochs are 264
# steps, so a factor of 0.1 shrinks the scales about as much (Σ lr·factor ≈ 1.4) as the paper's
# 3.5e-4 over 200 CIFAR-10 epochs of 391 steps at its learning rates.
DIGITS = {
    "dataset": "digits",
    "train_examples": None,
    "test_examples": None,
    "depth": 14,
    "epochs": 12,
    "batch_size": 64,
    "learning_rate": 0.1,
    "sparsity": 0.1,
    "sparsity_method": "proximal",
    "thresholds": [1e-3, 0.02, 0.05, 0.08, 0.12],
    "finetune_epochs": 3,
    "finetune_learning_rate": 0.01,
    "timing": {"batch_size": 64, "warmup": 3, "iters": 5, "repeats": 11},
    "seed": 0,
}
# Fashion-MNIST on 2 CPU cores (~11 ms per training image, see docs/studies.md): the first 2,000
# training images for 6 epochs (186 steps). A factor of 0.15 keeps the digits run's Σ lr·factor:
# it zeroes 405 of 736 scales but holds the ResNet at 60.7% test accuracy (76% without
# sparsity); 0.05 kept 75.8% but zeroed none, and nothing was pruned up to threshold 0.08. One
# fine-tuning epoch; accuracy on the first 3,000 test images (20 models are evaluated);
# throughput at batch 128.
FASHION_MNIST = {
    **DIGITS,
    "dataset": "fashion_mnist",
    "train_examples": 2000,
    "test_examples": 3000,
    "epochs": 6,
    "sparsity": 0.15,
    "finetune_epochs": 1,
    "timing": {"batch_size": 128, "warmup": 2, "iters": 3, "repeats": 5},
}
QUICK = {
    **FASHION_MNIST,
    "train_examples": 256,
    "test_examples": 256,
    "epochs": 1,
    "thresholds": [1e-3, 0.05],
    "finetune_epochs": 1,
    "timing": {"batch_size": 32, "warmup": 1, "iters": 1, "repeats": 3},
}
CONFIGS = {"fashion_mnist": FASHION_MNIST, "digits": DIGITS}
CONFIG = FASHION_MNIST
KINDS = ("ResNet", "RMNet")


def _log(message: str) -> None:
    print(message, flush=True)


def _finetune(model, cfg, train, test) -> None:
    from keras_dmr.recipe import StepDecay, compile_with_recipe

    compile_with_recipe(model, learning_rate=cfg["finetune_learning_rate"])
    model.fit(
        train,
        epochs=cfg["finetune_epochs"],
        shuffle=False,
        verbose=0,
        callbacks=[StepDecay()],
    )


def run(cfg: dict = CONFIG) -> dict:
    """Train, prune, fine-tune and measure; returns the JSON record."""
    import keras

    import keras_dmr
    from keras_dmr import data
    from keras_dmr import prune as kp
    from keras_dmr.analysis.flops import count_flops
    from keras_dmr.convert import to_plain
    from keras_dmr.recipe import StepDecay, compile_with_recipe
    from keras_dmr.utils.timing import load_average, machine_description

    start = time.monotonic()
    keras.utils.set_random_seed(cfg["seed"])
    # Whole batches only: TensorFlow 2.21's oneDNN CPU kernels crash (segfault / double free)
    # training some pruned functional ResNets on the short last batch.
    train = data.load(
        cfg["dataset"],
        "train",
        batch_size=cfg["batch_size"],
        seed=cfg["seed"],
        drop_remainder=True,
        take=cfg.get("train_examples"),
    )
    test = data.load(cfg["dataset"], "test", batch_size=256, take=cfg.get("test_examples"))

    resnet = kp.with_skip_bn(keras_dmr.ResNet(depth=cfg["depth"], compile=False))
    compile_with_recipe(resnet, learning_rate=cfg["learning_rate"])
    _log(f"training ResNet-{cfg['depth']} with BN sparsity {cfg['sparsity']} ...")
    resnet.fit(
        train,
        epochs=cfg["epochs"],
        shuffle=False,
        verbose=0,
        callbacks=[StepDecay(), kp.BNSparsity(cfg["sparsity"], cfg["sparsity_method"])],
    )
    scales = kp.bn_scales(resnet)
    plain = to_plain(resnet, fuse_bn=False)
    trained = {
        "accuracy": kp.accuracy(resnet, test),
        "plain_accuracy": kp.accuracy(plain, test),
        "conversion_error": plain.conversion_report["max_relative_error"],
        "scales": int(scales.size),
        "scales_zero": int(np.sum(scales == 0)),
        "scale_quantiles": {q: float(np.quantile(scales, q)) for q in (0.25, 0.5, 0.75)},
        "seconds": round(time.monotonic() - start, 1),
    }
    _log(f"  accuracy {trained['accuracy']:.4f}; {trained['scales_zero']} of {scales.size} zero")

    deploy = {
        "ResNet": kp.slim_residual(resnet, threshold=0.0, fuse_bn=True),
        "RMNet": kp.slim(plain, threshold=0.0, fuse_bn=True),
    }
    base_params = deploy["ResNet"].count_params()
    points = []
    for t in cfg["thresholds"]:
        for kind in KINDS:
            pruned = kp.slim_residual(resnet, t) if kind == "ResNet" else kp.slim(plain, t)
            report = pruned.pruning_report
            pruned_accuracy = kp.accuracy(pruned, test)
            _finetune(pruned, cfg, train, test)
            name = f"{kind} t={t:g}"
            deploy[name] = kp.fuse_batchnorm(pruned)
            params = deploy[name].count_params()
            points.append(
                {
                    "kind": kind,
                    "threshold": t,
                    "name": name,
                    "channels": report["channels_after"],
                    "channels_before": report["channels_before"],
                    "params": params,
                    "flops": count_flops(deploy[name]),
                    "pruned_params_ratio": 1 - params / base_params,
                    "accuracy_pruned": pruned_accuracy,
                    "accuracy": kp.accuracy(deploy[name], test),
                }
            )
            p = points[-1]
            _log(
                f"  {name:<14} params {params:>7,} ({p['pruned_params_ratio']:.1%} pruned), "
                f"accuracy {pruned_accuracy:.4f} → {p['accuracy']:.4f} after fine-tuning"
            )
    _log("timing every model, interleaved ...")
    timing = cfg["timing"]
    speed = kp.throughput(
        deploy,
        batch_size=timing["batch_size"],
        warmup=timing["warmup"],
        iters=timing["iters"],
        repeats=timing["repeats"],
        spread=True,
    )
    for p in points:
        p["images_per_s"], *p["images_per_s_range"] = speed[p["name"]]
    unpruned = {
        kind: {
            "params": deploy[kind].count_params(),
            "flops": count_flops(deploy[kind]),
            "accuracy": kp.accuracy(deploy[kind], test),
            "images_per_s": speed[kind][0],
            "images_per_s_range": list(speed[kind][1:]),
        }
        for kind in KINDS
    }
    return {
        "config": cfg,
        "trained": trained,
        "unpruned": unpruned,
        "points": points,
        "machine": machine_description(),
        "load_average": load_average(),
        "test_images": sum(int(y.shape[0]) for _, y in test),
        "wall_seconds": round(time.monotonic() - start, 1),
    }


def _speed(row: dict) -> str:
    low, high = row.get("images_per_s_range", (None, None))
    text = f"{row['images_per_s']:,.0f}"
    return text if low is None else f"{text} ({low:,.0f}–{high:,.0f})"


def summary(record: dict) -> str:
    """What the points say, computed from them: pairs at the same threshold."""
    pairs = []
    for t in record["config"]["thresholds"]:
        by = {p["kind"]: p for p in record["points"] if p["threshold"] == t}
        if set(by) == set(KINDS):
            pairs.append((by["ResNet"], by["RMNet"]))
    if not pairs:
        return ""
    more = [(b["pruned_params_ratio"] - a["pruned_params_ratio"]) * 100 for a, b in pairs]
    macs = [b["flops"] / a["flops"] for a, b in pairs]
    speed = [b["images_per_s"] / a["images_per_s"] for a, b in pairs]
    acc = [(b["accuracy"] - a["accuracy"]) * 100 for a, b in pairs]
    test_images = record.get("test_images", 360)
    return (
        f"At the same threshold the pruned RMNet has {min(more):.1f} to {max(more):.1f} "
        "percentage points more of the ResNet's parameters pruned, "
        f"{min(macs):.2f}× to {max(macs):.2f}× the pruned ResNet's MACs and "
        f"{min(speed):.2f}× to {max(speed):.2f}× its measured throughput (median); after "
        f"fine-tuning its accuracy differs by {min(acc):+.2f} to {max(acc):+.2f} points "
        f"(one test image is {100 / test_images:.2f} points; one training run, one seed)."
    )


def _plural(n: int) -> str:
    return "" if n == 1 else "s"


def table(record: dict) -> str:
    """The results table of docs/pruning.md."""
    lines = [
        "| threshold | model | parameters (pruned) | MACs | accuracy after pruning → "
        "fine-tuned | images/s (median; slowest–fastest repeat) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for kind in KINDS:
        u = record["unpruned"][kind]
        lines.append(
            f"| – | {kind} (unpruned) | {u['params']:,} | {u['flops'] / 1e6:.2f}M | "
            f"{u['accuracy']:.2%} | {_speed(u)} |"
        )
    for p in record["points"]:
        lines.append(
            f"| {p['threshold']:g} | {p['kind']} | {p['params']:,} "
            f"({p['pruned_params_ratio']:.1%}) | {p['flops'] / 1e6:.2f}M | "
            f"{p['accuracy_pruned']:.2%} → {p['accuracy']:.2%} | {_speed(p)} |"
        )
    lines += ["", summary(record)]
    cfg, trained, machine = record["config"], record["trained"], record["machine"]
    load = record.get("load_average")
    lines += [
        "",
        f"ResNet-{cfg['depth']} with `skip_bn`, {cfg['epochs']} epochs on {cfg['dataset']}"
        + (
            f" (the first {cfg['train_examples']:,} training images)"
            if cfg.get("train_examples")
            else ""
        )
        + f", tested on {record['test_images']:,} test images "
        f"(recipe, lr {cfg['learning_rate']}), `BNSparsity({cfg['sparsity']}, "
        f"{cfg['sparsity_method']!r})`: test accuracy {trained['accuracy']:.2%}, "
        f"{trained['scales_zero']} of {trained['scales']} scales exactly 0. Every pruned model "
        f"fine-tuned {cfg['finetune_epochs']} epoch{_plural(cfg['finetune_epochs'])} "
        f"(lr {cfg['finetune_learning_rate']}, step "
        'schedule); parameters and MACs with BN folded; "pruned" is relative to the unpruned '
        "ResNet's parameters (the unpruned RMNet has more: its reserved channels). Throughput: "
        f"batch {cfg['timing']['batch_size']}, median of {cfg['timing']['repeats']} repeats of "
        f"{cfg['timing']['iters']} calls, all models interleaved, on {machine['cpu']} "
        f"({machine['usable_cores']} usable cores, TensorFlow {machine['tensorflow']}"
        + (f", load average {load[0]:.1f} while timing" if load else "")
        + f"). Whole run: {record['wall_seconds'] / 60:.1f} min.",
    ]
    return "\n".join(lines)


def plot(record: dict, path: str | Path) -> None:
    """Fig. 7: accuracy against measured throughput and against the pruned-parameter ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"ResNet": ("tab:blue", "o"), "RMNet": ("tab:red", "s")}
    for kind in KINDS:
        color, marker = styles[kind]
        pts = [p for p in record["points"] if p["kind"] == kind]
        u = record["unpruned"][kind]
        xs = [u["images_per_s"]] + [p["images_per_s"] for p in pts]
        ys = [u["accuracy"]] + [p["accuracy"] for p in pts]
        axes[0].scatter(xs[1:], ys[1:], marker=marker, color=color, label=f"pruned {kind}")
        axes[0].scatter(xs[:1], ys[:1], marker="*", s=160, color=color, label=f"{kind}")
        for p in pts:
            low, high = p.get("images_per_s_range", (p["images_per_s"],) * 2)
            axes[0].plot([low, high], [p["accuracy"]] * 2, color=color, alpha=0.3, lw=1)
            axes[0].annotate(
                f"{p['threshold']:g}",
                (p["images_per_s"], p["accuracy"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=color,
            )
        axes[1].plot(
            [p["pruned_params_ratio"] for p in pts],
            [p["accuracy"] for p in pts],
            marker=marker,
            color=color,
            label=f"pruned {kind}",
        )
        for p in pts:
            axes[1].annotate(
                f"{p['threshold']:g}",
                (p["pruned_params_ratio"], p["accuracy"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=color,
            )
    axes[0].set_xlabel("measured throughput (images/s, BN folded; bars: repeat range)")
    axes[0].set_ylabel("test accuracy after fine-tuning")
    axes[0].set_title("(a) accuracy vs speed (labels: threshold)")
    axes[1].set_xlabel("pruned parameters (fraction of the unpruned ResNet's)")
    axes[1].set_title("(b) accuracy vs pruned-parameter ratio (labels: threshold)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Network slimming on {record['config']['dataset']}: ResNet vs its plain RMNet")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# dataset → (JSON under docs/data, plot, generated section of docs/pruning.md)
OUTPUTS = {
    "fashion_mnist": ("pruning.json", "pruning.png", "pruning-results"),
    "digits": ("pruning_digits.json", "pruning_digits.png", "pruning-results-digits"),
}


def write_docs(record: dict, docs: Path) -> None:
    from keras_dmr.utils.markdown import replace_section

    json_name, png, section = OUTPUTS[record["config"]["dataset"]]
    (docs / "data").mkdir(parents=True, exist_ok=True)
    (docs / "data" / json_name).write_text(json.dumps(record, indent=2) + "\n")
    plot(record, docs / png)
    md = docs / "pruning.md"
    md.write_text(replace_section(md.read_text(), section, table(record)))


def main(argv=None) -> int:
    from tools.fmnist_study import quick_docs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", choices=tuple(CONFIGS), default="fashion_mnist", help="(default: %(default)s)"
    )
    parser.add_argument(
        "--docs",
        type=Path,
        help="the docs to regenerate (default: docs; with --quick: runs/quick-docs, a copy)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run on 256 images; never touches docs/"
    )
    parser.add_argument(
        "--table-only", action="store_true", help="regenerate table and plot from the JSON"
    )
    args = parser.parse_args(argv)
    docs = args.docs or (quick_docs() if args.quick else Path("docs"))
    if args.table_only:
        json_name = OUTPUTS[args.dataset][0]
        record = json.loads((docs / "data" / json_name).read_text())
    else:
        cfg = QUICK if args.quick else CONFIGS[args.dataset]
        record = run({**cfg, "dataset": args.dataset} if args.quick else cfg)
    write_docs(record, docs)
    _log(f"wrote {docs / 'pruning.md'} and its plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
