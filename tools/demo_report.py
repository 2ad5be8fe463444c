"""The README's measured figures of the main job, generated from the demo's own records.

``keras-dmr demo`` writes every figure of its closing table to ``runs/demo_<dataset>.json``
(``demo_<dataset>_<family>.json`` for ``--family resnet20``).
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


def _names() -> list[str]:
    """Every record name the demo writes: each dataset, each family, the default first."""
    from keras_dmr.cli.demo import FAMILIES, record_name

    return [record_name(d, f) for d in DATASETS for f in FAMILIES]


def records(data: Path = DATA) -> dict[str, dict]:
    """The stored demo records (file name → record), datasets in :data:`DATASETS` order."""
    return {
        name: json.loads((data / name).read_text()) for name in _names() if (data / name).exists()
    }


def section(found: dict[str, dict]) -> str:
    from keras_dmr.cli.demo import summary

    if not found:
        return "_not measured yet_ (`make demo`, then `python -m tools.demo_report`)"
    parts = []
    for r in found.values():
        name, p = r["dataset"], r["pruning"]
        model = r.get("model", "ResNet-20")  # records before --family were ResNet-20's
        trained = (
            f"**{name}**: {model} trained on {r['train_images']:,} images for {r['epochs']} epochs"
        )
        if p is None:
            how = f"{trained}; its plain form, {r['plain_model']}, ships unpruned."
        elif "prune_macs" in r:
            how = (
                f"{trained} with sparsity factor {r['sparsity_factor']:.4g}; its plain form "
                f"pruned over the whole graph to {r['prune_macs']:g}× the residual model's MACs "
                f"in {r['prune_steps']} cut(s) with {r['finetune_epochs']} fine-tuning epoch(s) "
                f"after each ({p['params_before']:,} → {p['params_after']:,} parameters, "
                f"{p['macs_before']:,} → {p['macs_after']:,} MACs before BN fusion)."
            )
        else:  # records of the threshold slimming the demo did before issue 28
            how = (
                f"{trained} with sparsity factor {r['sparsity_factor']:.4g}; slimming at "
                f"threshold {r['prune_threshold']:g} kept {p['channels_after']:,} of "
                f"{p['channels_before']:,} channels ({p['params_before']:,} → "
                f"{p['params_after']:,} parameters), {r['finetune_epochs']} fine-tuning epochs."
            )
        parts += [
            how,
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

    for name in _names():
        new = args.source / name
        if new.exists():
            shutil.copyfile(new, DATA / new.name)
            print(f"copied {new} → {DATA / new.name}")
    text = replace_section(args.readme.read_text(), "demo-results", section(records()))
    args.readme.write_text(text)
    print(f"regenerated the demo-results section of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
