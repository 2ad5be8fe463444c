"""DMRNet's Table 2 on Fashion-MNIST: DMRNet-14 against ResNet-26, DVANet-14 and a wide ResNet-14.

``python -m tools.study_table2`` trains the runs not yet in ``docs/data/fashion_mnist_runs.json``
(protocol in :mod:`tools.fmnist_study`: ~50 minutes on 2 CPU cores), then regenerates the
Table 2 section and plot of ``docs/studies.md`` and the residual-vs-plain accuracy table;
``--table-only`` only regenerates; ``--quick`` is a one-minute smoke run.
"""

from __future__ import annotations

from pathlib import Path

from tools import fmnist_study as fs

LABELS = ["DMRNet-14", "DVANet-14", "ResNet-26", "Wide ResNet-14 (23/46/92)"]
# The paper's CIFAR-10 error at 0.4M parameters (Table 2, mean ± std of 5 runs), for reference.
PAPER = {
    "DMRNet-14": "6.48 ± 0.04",
    "DVANet-14": "6.53 ± 0.12",
    "ResNet-26": "6.62 ± 0.24",
    "Wide ResNet-14 (23/46/92)": "6.62 ± 0.20",
}
CLAIM = ["DMRNet-14", "DVANet-14", "ResNet-26"]


def sections(runs: dict, protocol: dict) -> dict[str, str]:
    """The generated sections of docs/studies.md this study writes, from the runs JSON."""
    table = fs.study_section(runs, LABELS, PAPER, CLAIM, protocol)
    return {"table2": table, "conversion-accuracy": fs.conversion_section(runs, protocol)}


def write_docs(runs: dict, protocol: dict, docs: Path) -> None:
    fs.write_sections(docs / "studies.md", sections(runs, protocol))
    chosen = fs.select(runs, LABELS, protocol)
    if any(chosen.values()):
        fs.bar_plot(chosen, docs / "study_table2.png", "Table 2 on Fashion-MNIST")


def main(argv=None) -> int:
    return fs.main(argv, description=__doc__.splitlines()[0], labels=LABELS, write_docs=write_docs)


if __name__ == "__main__":
    raise SystemExit(main())
