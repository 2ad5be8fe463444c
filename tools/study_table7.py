"""DMRNet's Table 7 on Fashion-MNIST: merge-and-run against identity mapping (K = 2, depth 14).

``python -m tools.study_table7`` trains the runs not yet in ``docs/data/fashion_mnist_runs.json``
(the merge-and-run runs are Table 2's DMRNet-14, reused; ~25 minutes on 2 CPU cores for the
rest), then regenerates the Table 7 section and plot of ``docs/studies.md``; ``--table-only``
only regenerates; ``--quick`` is a one-minute smoke run.
"""

from __future__ import annotations

from pathlib import Path

from tools import fmnist_study as fs

LABELS = [
    "DMRNet-14",
    "Identity-14, shared conv0/classifier",
    "Identity-14, separate conv0/classifier",
]
# The paper's Table 7 has no depth 14; its CIFAR-10 errors at L = 48 (depth 50), for reference.
PAPER = {
    "DMRNet-14": "4.99 (L = 48)",
    "Identity-14, shared conv0/classifier": "5.21 (L = 48)",
    "Identity-14, separate conv0/classifier": "4.67 (L = 48; merge-and-run 4.41)",
}
# The paper compares the mappings at equal sharing: merge-and-run against identity, both sharing
# conv0 and the classifier. (Its "w/o sharing" rows pit identity against merge-and-run without
# sharing; the builders make only the identity form without sharing.)
CLAIM = ["DMRNet-14", "Identity-14, shared conv0/classifier"]


def sections(runs: dict, protocol: dict) -> dict[str, str]:
    """The generated sections of docs/studies.md this study writes, from the runs JSON."""
    table = fs.study_section(runs, LABELS, PAPER, CLAIM, protocol)
    return {
        "table7": table,
        "conversion-accuracy": fs.conversion_section(runs, protocol),
    }


def write_docs(runs: dict, protocol: dict, docs: Path) -> None:
    fs.write_sections(docs / "studies.md", sections(runs, protocol))
    chosen = fs.select(runs, LABELS, protocol)
    if any(chosen.values()):
        fs.bar_plot(chosen, docs / "study_table7.png", "Table 7 on Fashion-MNIST")


def main(argv=None) -> int:
    return fs.main(argv, description=__doc__.splitlines()[0], labels=LABELS, write_docs=write_docs)


if __name__ == "__main__":
    raise SystemExit(main())
