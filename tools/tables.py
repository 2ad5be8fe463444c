"""Generated sections of the docs: tables computed from the code (and measured JSON), never typed.

A doc marks a generated section with ``<!-- BEGIN name -->`` … ``<!-- END name -->``;
``python -m tools.tables`` rewrites every section it knows.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import keras_dmr
from keras_dmr.utils.markdown import replace_section

# (label, builder, kwargs, paper's parameter count in millions, source)
PAPER_PARAMETERS = [
    ("DMRNet-14", keras_dmr.DMRNet, dict(depth=14), 0.4, "Table 2"),
    ("DMRNet-20", keras_dmr.DMRNet, dict(depth=20), 0.6, "Table 2"),
    ("DMRNet-38", keras_dmr.DMRNet, dict(depth=38), 1.2, "Table 2"),
    ("DMRNet-50", keras_dmr.DMRNet, dict(depth=50), 1.5, "Table 2"),
    ("ResNet-26", keras_dmr.ResNet, dict(depth=26), 0.4, "Table 2"),
    ("ResNet-38", keras_dmr.ResNet, dict(depth=38), 0.6, "Table 2"),
    ("ResNet-74", keras_dmr.ResNet, dict(depth=74), 1.2, "Table 2"),
    ("ResNet-98", keras_dmr.ResNet, dict(depth=98), 1.5, "Table 2"),
    (
        "Wide ResNet-14 (23/46/92)",
        keras_dmr.ResNet,
        dict(depth=14, widths=(23, 46, 92)),
        0.4,
        "Table 2",
    ),
    (
        "Wide ResNet-50 (23/46/92)",
        keras_dmr.ResNet,
        dict(depth=50, widths=(23, 46, 92)),
        1.5,
        "Table 2",
    ),
    ("DVANet-50", keras_dmr.DVANet, dict(depth=50), 1.5, "Table 2"),
    ("DMRNet-56", keras_dmr.DMRNet, dict(depth=56), 1.7, "Table 5"),
    ("DMRNet-Wide-32", keras_dmr.DMRNet, dict(depth=32, width=4), 14.9, "Table 5"),
    ("DMRNet-Wide-50", keras_dmr.DMRNet, dict(depth=50, width=4), 24.8, "Table 5"),
    ("DMRNeXt-29", keras_dmr.DMRNeXt, dict(depth=29), 26.7, "Table 5"),
    ("DMRNet-50 (ImageNet)", keras_dmr.DMRNet, dict(depth=50, variant="imagenet"), 46.4, "Table 6"),
    ("ResNet-98 (ImageNet)", keras_dmr.ResNet, dict(depth=98, variant="imagenet"), 45.0, "Table 6"),
]


@functools.cache
def parameter_counts() -> dict[str, int]:
    """Our parameter count for every row of :data:`PAPER_PARAMETERS` (models built once)."""
    return {
        label: builder(compile=False, **kwargs).count_params()
        for label, builder, kwargs, _, _ in PAPER_PARAMETERS
    }


def parameter_table() -> str:
    rows = [
        "| model | source | paper | keras_dmr | difference |",
        "|---|---|---:|---:|---:|",
    ]
    counts = parameter_counts()
    for label, _, _, paper, source in PAPER_PARAMETERS:
        ours = counts[label]
        diff = (ours / 1e6 - paper) / paper
        rows.append(
            f"| {label} | {source} | {paper}M | {ours / 1e6:.3f}M ({ours:,}) | {diff:+.1%} |"
        )
    return "\n".join(rows)


def train_step_table(json_path: str | Path) -> str:
    data = json.loads(Path(json_path).read_text())
    m = data["machine"]
    gpus = f", GPU {', '.join(m['gpus'])}" if m["gpus"] else ""
    rows = [
        f"Measured on {m['cpu']} ({m['cores']} cores{gpus}), "
        f"TensorFlow {m['tensorflow']}, Keras {m['keras']}; batch {data['batch_size']}, "
        f"median of {data['repeats']} interleaved repeats of {data['iters']} steps.",
        "",
        "| model | params | train step (ms) | spread (ms) | × ResNet-98 "
        "| inference (ms) | × ResNet-98 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in data["results"].items():
        lo, hi = r["train_step_spread_ms"]
        rows.append(
            f"| {name} | {r['params'] / 1e6:.2f}M | {r['train_step_ms']:.0f} | {lo:.0f}–{hi:.0f} "
            f"| {r['train_vs_resnet98']:.2f} | {r['inference_ms']:.0f} "
            f"| {r['inference_vs_resnet98']:.2f} |"
        )
    return "\n".join(rows)


def regenerate(docs_dir: str | Path = "docs") -> None:
    docs = Path(docs_dir)
    path = docs / "architectures.md"
    text = replace_section(path.read_text(), "parameters", parameter_table())
    timing = docs / "data" / "train_step_cpu.json"
    if timing.exists():
        text = replace_section(text, "train-step", train_step_table(timing))
    path.write_text(text)


if __name__ == "__main__":
    regenerate()
