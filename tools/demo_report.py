"""The README's measured figures of the main job, generated from the demo's own records.

``keras-dmr demo`` writes every figure of its closing table to ``runs/demo_<dataset>.json``.
``python -m tools.demo_report`` copies those records to ``docs/data/`` (``--from DIR`` to take
them elsewhere; without new records it keeps the stored ones) and regenerates the README's
``demo-results`` section from ``docs/data/demo_*.json``: for each dataset, how the model was
trained and pruned, the table and the targets as the demo printed them.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

DATA = Path("docs/data")
DATASETS = ("digits", "fashion_mnist")


def records(data: Path = DATA) -> dict[str, dict]:
    """The stored demo record of each dataset that has one, in :data:`DATASETS` order."""
    return {
        name: json.loads((data / f"demo_{name}.json").read_text())
        for name in DATASETS
        if (data / f"demo_{name}.json").exists()
    }


def section(found: dict[str, dict]) -> str:
    from keras_dmr.cli.demo import summary

    if not found:
        return "_not measured yet_ (`make demo`, then `python -m tools.demo_report`)"
    parts = []
    for name, r in found.items():
        p = r["pruning"]
        parts += [
            f"**{name}**: ResNet-20 trained on {r['train_images']:,} images for {r['epochs']} "
            f"epochs with sparsity factor {r['sparsity_factor']:.4g}; slimming at threshold "
            f"{r['prune_threshold']:g} kept {p['channels_after']:,} of {p['channels_before']:,} "
            f"channels ({p['params_before']:,} → {p['params_after']:,} parameters), "
            f"{r['finetune_epochs']} fine-tuning epochs.",
            "",
            "```text",
            summary(r["rows"], r["machine"], r["load_average"]),
            "```",
            "",
        ]
    return "\n".join(parts).rstrip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=Path("runs"),
        help="where the demo wrote its records (default: runs)",
    )
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    args = parser.parse_args(argv)
    from keras_dmr.utils.markdown import replace_section

    for name in DATASETS:
        new = args.source / f"demo_{name}.json"
        if new.exists():
            shutil.copyfile(new, DATA / new.name)
            print(f"copied {new} → {DATA / new.name}")
    text = replace_section(args.readme.read_text(), "demo-results", section(records()))
    args.readme.write_text(text)
    print(f"regenerated the demo-results section of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
