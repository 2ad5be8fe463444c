"""``keras-dmr paths``: path-length distributions (Fig. 3)."""

from __future__ import annotations

import argparse

from keras_dmr.analysis import path_length_distribution, path_length_stats, plot_path_lengths
from keras_dmr.cli.common import (
    DISPLAY,
    FIG3,
    MODELS,
    PATHS_DEPTHS,
    _add_model_arguments,
    _model_options,
    build_model,
)
from keras_dmr.errors import UsageError
from keras_dmr.utils.arguments import output_path

# --------------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------------


def add_paths_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        choices=tuple(MODELS),
        help="one network to analyse (default: Fig. 3's ResNet-38, DVANet-20 and DMRNet-20)",
    )
    _add_model_arguments(
        parser,
        depth_help="with --model: layers on the longest path (default: "
        + ", ".join(f"{m} {d}" for m, d in PATHS_DEPTHS.items())
        + ")",
    )
    parser.add_argument(
        "--output",
        type=output_path("file"),
        default="paths.png",
        metavar="PATH",
        help="plot file (default: paths.png)",
    )


def describe_distribution(distribution: dict[int, float]) -> str:
    """One line: mean ± std, range, most common length and the central 90% of paths."""
    mean, std = path_length_stats(distribution)
    lengths = sorted(distribution)
    mode = max(lengths, key=distribution.__getitem__)
    cumulative, low, high = 0.0, None, lengths[-1]
    for n in lengths:
        cumulative += distribution[n]
        if low is None and cumulative >= 0.05:
            low = n
        if cumulative >= 0.95:
            high = n
            break
    return (
        f"mean {mean:.2f} ± {std:.2f}  lengths {lengths[0]}-{lengths[-1]}, "
        f"mode {mode} ({distribution[mode]:.1%} of paths), 90% within {low}-{high}"
    )


def run_paths(args: argparse.Namespace) -> int:
    options = _model_options(args)
    if args.model is None:
        given = [f"--{k}" for k, v in {"depth": args.depth, **options}.items() if v is not None]
        if given:
            raise UsageError(f"argument {given[0]}: needs --model")
        specs = [(model, depth, {}) for model, depth in FIG3]
    else:
        specs = [(args.model, args.depth or PATHS_DEPTHS[args.model], options)]
    models = {}
    for model, depth, opts in specs:
        net = build_model(model, depth, compile=False, **opts)
        k = opts.get("branches")
        models[f"{DISPLAY[model]}-{depth}" + (f" (K={k})" if k else "")] = net
    width = max(len(label) for label in models)
    for label, net in models.items():
        print(f"{label:<{width}}  {describe_distribution(path_length_distribution(net))}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    plot_path_lengths(models, str(args.output))
    print(f"wrote {args.output}")
    return 0
