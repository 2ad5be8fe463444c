"""Markdown tables and PNG charts from a benchmark JSON, and ``docs/benchmarks.md`` from them.

``python -m keras_dmr.bench.report [JSON] [--gpu JSON] [--docs DIR]`` rewrites the generated
sections of ``DIR/benchmarks.md`` (default ``docs``, JSON default
``docs/data/benchmarks_cpu.json``; ``bench-gpu-*`` sections from ``--gpu``) and redraws the
charts beside it; ``--merge PART...`` first joins runs split by ``--sections``. Nothing is timed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from keras_dmr.bench import int8_gain
from keras_dmr.bench.conversion import table as conversion_table
from keras_dmr.bench.deploy import table as deploy_table
from keras_dmr.bench.engines import ENGINES, engine_label
from keras_dmr.bench.train_throughput import table as train_table
from keras_dmr.utils.files import save_figure, write_json, write_text

CHARTS = {
    "speedup": "benchmarks_speedup.png",
    "accuracy": "benchmarks_accuracy.png",
    "deploy": "benchmarks_deploy.png",
}
SECTIONS = (
    "machine",
    "targets",
    "families",
    "speedup",
    "efficiency",
    "peers",
    "training",
    "train",
    "conversion",
    "deploy",
    "int8",
)
# Sections the docs show once per machine, from every docs/data file that matches the pattern,
# not from the one run that regenerates the others: name -> (pattern, text of one file's
# result and the stem its pattern's "*" matched).
PER_MACHINE = {
    "train": ("benchmarks_train_*.json", lambda data, stem: train_table(data.get("train"))),
    "deploy-machines": (
        "benchmarks_deploy_*.json",
        lambda data, stem: deploy_machine_text(data, stem),
    ),
}


def _backend(groups_or_data) -> str:
    """The Keras backend a run used (runs before the field existed were TensorFlow's)."""
    if isinstance(groups_or_data, dict):
        return groups_or_data.get("machine", {}).get("backend") or "tensorflow"
    return next((g.get("backend") for g in groups_or_data if g.get("backend")), "tensorflow")


def _mb(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def _engines(records) -> list[str]:
    seen = {r["engine"] for r in records}
    return [e for e in ENGINES if e in seen]


def _rows_by_label(records) -> dict[str, dict[str, dict]]:
    """label → engine → record, labels in the order they were timed."""
    rows: dict[str, dict[str, dict]] = {}
    for r in records:
        rows.setdefault(r["label"], {})[r["engine"]] = r
    return rows


def _speed(r: dict | None) -> str:
    if r is None:
        return "–"
    if "error" in r:
        return "failed"
    if "images_per_s" not in r:
        return "–"
    lo, hi = r["images_per_s_spread"]
    return f"{r['images_per_s']:,.0f} ({lo:,.0f}–{hi:,.0f})"


def _efficiency(r: dict | None) -> str:
    if r is None or "gflops" not in r:
        return "failed" if r and "error" in r else "–"
    share = f" ({100 * r['peak_fraction']:.0f}%)" if "peak_fraction" in r else ""
    return f"{r['gflops']:.1f}{share}"


def _framework(m: dict) -> str:
    if m.get("backend", "tensorflow") == "jax":
        precision = m.get("jax_default_matmul_precision") or "default"
        return f"JAX {m.get('jax')} (Keras backend; float32 matmul precision: {precision})"
    return f"TensorFlow {m['tensorflow']}"


def machine_text(data: dict) -> str:
    m, p = data["machine"], data.get("peak")
    gpus = ", ".join(g["name"] for g in m.get("gpu_details", [])) or "none"
    lines = [
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m.get('usable_cores', m['cores'])} usable), "
        f"GPU: {gpus}; device the models ran on: `{m.get('device', '?')}`.",
        f"- Software: {_framework(m)}, Keras {m['keras']}, "
        + (
            f"ONNX Runtime {m['onnxruntime']} ({', '.join(m.get('onnxruntime_providers', []))}), "
            if m.get("onnxruntime")
            else ""
        )
        + f"Python {m['python']}.",
    ]
    before, after = m.get("load_average_before"), m.get("load_average_after")
    if before and after:
        lines.append(
            f"- Load average (1/5/15 min) before the run {before[0]:.2f}/{before[1]:.2f}/"
            f"{before[2]:.2f}, after {after[0]:.2f}/{after[1]:.2f}/{after[2]:.2f}; the run took "
            f"{data.get('duration_s', 0) / 60:.0f} min."
        )
    for kind, title in (("families", "Families (32×32)"), ("peers", "ImageNet peers (224×224)")):
        groups = [g for g in data["inference"] if g["section"] == kind]
        if groups:
            g = groups[0]
            lines.append(
                f"- {title}: batch {g['batch_size']}, {g['warmup']} warm-up batches, then "
                f"{g['repeats']} interleaved rounds of {g['iters']} timed batches per candidate "
                "(images/s from the median round; spread = slowest–fastest round)."
            )
    for g in data.get("training", []):
        lines.append(
            f"- Training steps: batch {g['batch_size']}, {g['warmup']} warm-up steps, "
            f"{g['repeats']} interleaved rounds of {g['iters']} steps; inference of the same "
            f"models at batch {g['inference_batch_size']} "
            f"({engine_label('keras', _backend(data))})."
        )
    if p:
        fw = {"tensorflow": "TensorFlow", "jax": "JAX", "onnxruntime": "ONNX Runtime"}
        parts = [
            f"{fw.get(k.removesuffix('_gflops'), k)} {p[k]:.0f}"
            for k in ("tensorflow_gflops", "jax_gflops", "onnxruntime_gflops")
            if k in p
        ]
        end = data.get("peak_end")
        group_peaks = [g["peak"]["gflops"] for g in data["inference"] if g.get("peak")]
        lines.append(
            f"- Peak: a {p['size']}×{p['size']} float32 matrix product (2·n³ flops), "
            f"GFLOP/s at the start: {', '.join(parts)}"
            + (f"; at the end: {end['gflops']:.0f}" if end else "")
            + ". A group's share of the peak uses the faster framework's product timed just "
            "before and just after that group (mean of the two)"
            + (
                f": {min(group_peaks):.0f}–{max(group_peaks):.0f} GFLOP/s over the groups"
                if group_peaks
                else ""
            )
            + f". GFLOP/s of a model count {data.get('flops_per_mac', 2)} flops per "
            "multiply-accumulate of `count_flops`."
        )
    if data["settings"].get("quick"):
        lines.append("- **--quick run**: tiny settings and stand-in models; figures mean little.")
    return "\n".join(lines)


def throughput_table(groups: list[dict]) -> str:
    """Images/s (spread) per model and engine."""
    records = [r for g in groups for r in g["results"]]
    if not records:
        return "_not measured_"
    engines = _engines(records)
    head = ["group", "model", "params", "MACs/image", "act. MB/image"]
    head += [f"{engine_label(e, _backend(groups))} img/s" for e in engines]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for g in groups:
        for label, by_engine in _rows_by_label(g["results"]).items():
            r = next(iter(by_engine.values()))
            cells = [
                g["name"],
                label,
                f"{r['params'] / 1e6:.2f}M",
                f"{r['macs'] / 1e6:,.0f}M",
                _mb(r["activation_mb"]),
            ]
            cells += [_speed(by_engine.get(e)) for e in engines]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def efficiency_table(groups: list[dict]) -> str:
    """GFLOP/s achieved and the share of the matrix-product peak, per model and engine."""
    records = [r for g in groups for r in g["results"]]
    if not records:
        return "_not measured_"
    engines = _engines(records)
    head = ["model", "dense convs", "batch"]
    head += [engine_label(e, _backend(groups)) for e in engines]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|" + "---:|" * len(engines)]
    for g in groups:
        for label, by_engine in _rows_by_label(g["results"]).items():
            r = next(iter(by_engine.values()))
            cells = [label, "yes" if r["dense"] else "no", str(g["batch_size"])]
            cells += [_efficiency(by_engine.get(e)) for e in engines]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speedups(data: dict) -> list[dict]:
    """Per model timed in both forms: plain/residual throughput per engine, MACs and
    activation ratios."""
    out = []
    for g in data["inference"]:
        by_model: dict[str, dict[str, dict[str, dict]]] = {}
        for r in g["results"]:
            by_model.setdefault(r["model"], {}).setdefault(r["form"], {})[r["engine"]] = r
        for model, forms in by_model.items():
            if "plain" not in forms or "residual" not in forms:
                continue
            res, pl = forms["residual"], forms["plain"]
            any_res, any_pl = next(iter(res.values())), next(iter(pl.values()))
            ratios = {
                e: pl[e]["images_per_s"] / res[e]["images_per_s"]
                for e in ENGINES
                if e in res and e in pl and "images_per_s" in res[e] and "images_per_s" in pl[e]
            }
            out.append(
                {
                    "group": g["name"],
                    "model": model,
                    "macs_ratio": any_pl["macs"] / any_res["macs"],
                    "activation_ratio": any_pl["activation_mb"] / any_res["activation_mb"]
                    if any_pl["activation_mb"] and any_res["activation_mb"]
                    else None,
                    "speedup": ratios,
                }
            )
    return out


def speedup_table(data: dict) -> str:
    rows = speedups(data)
    if not rows:
        return "_not measured_"
    engines = [e for e in ENGINES if any(e in r["speedup"] for r in rows)]
    head = ["model", "plain/residual MACs", "plain/residual act. MB"]
    head += [engine_label(e, _backend(data)) for e in engines]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        act = "–" if r["activation_ratio"] is None else f"{r['activation_ratio']:.2f}×"
        cells = [r["model"], f"{r['macs_ratio']:.2f}×", act]
        cells += [f"{r['speedup'][e]:.2f}×" if e in r["speedup"] else "–" for e in engines]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_table(data: dict) -> str:
    if not data.get("training"):
        return "_not measured_"
    lines = []
    for g in data["training"]:
        lines += [
            "| model | params | MACs/image | train step ms (spread) "
            "| inference ms/batch (spread) |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, r in g["results"].items():
            lo, hi = r["train_step_spread_ms"]
            ilo, ihi = r["inference_spread_ms"]
            lines.append(
                f"| {label} | {r['params'] / 1e6:.3f}M | {r['macs'] / 1e6:.0f}M | "
                f"{r['train_step_ms']:.0f} ({lo:.0f}–{hi:.0f}) | "
                f"{r['inference_batch_ms']:.0f} ({ilo:.0f}–{ihi:.0f}) |"
            )
        lines += [
            "",
            "| model / baseline | train step time ratio (per round) | inference time ratio |",
            "|---|---:|---:|",
        ]
        for p in g["pairs"]:
            rounds = ", ".join(f"{v:.2f}" for v in p["train_ratio_per_round"])
            lines.append(
                f"| {p['model']} / {p['baseline']} | {p['train_step_ratio']:.2f}× ({rounds}) | "
                f"{p['inference_time_ratio']:.2f}× |"
            )
    return "\n".join(lines)


def targets_table(data: dict) -> str:
    # Evaluated from the measurements with today's rules (a run stores the targets of its day).
    from keras_dmr.bench.targets import evaluate_targets

    targets = evaluate_targets(data)
    if not targets:
        return "_not measured_"
    lines = ["| target | rule | measured | met | paper |", "|---|---|---|---|---|"]
    for t in targets:
        parts = []
        for v in t["values"]:
            what = engine_label(v["what"], _backend(data)) if v["what"] in ENGINES else v["what"]
            if t.get("percent"):
                value = f"{100 * v['value']:.0f}%"
            elif v.get("unit"):
                value = f"{v['value']:.1f} {v['unit']}"
            else:
                value = f"{v['value']:.2f}×"
            parts.append(f"{what}: {value}{'' if v['met'] else ' ✗'}")
        met = sum(bool(v["met"]) for v in t["values"])
        verdict = "yes" if met == len(t["values"]) else ("no" if met == 0 else "partly")
        verdict += f" ({met}/{len(t['values'])})"
        lines.append(
            f"| {t['target']} | {t['rule']} | {'; '.join(parts)} | {verdict} | {t['paper']} |"
        )
    return "\n".join(lines)


def int8_text(groups: list[dict]) -> str:
    """The plain int8 ÷ float32 table (:mod:`keras_dmr.bench.int8_gain`) and its summary."""
    return "\n\n".join(p for p in (int8_gain.table(groups), int8_gain.summary(groups)) if p)


def sections(data: dict) -> dict[str, str]:
    families = [g for g in data["inference"] if g["section"] == "families"]
    peers = [g for g in data["inference"] if g["section"] == "peers"]
    return {
        "machine": machine_text(data),
        "targets": targets_table(data),
        "families": throughput_table(families),
        "speedup": speedup_table(data),
        "efficiency": efficiency_table(families + peers),
        "peers": throughput_table(peers),
        "training": training_table(data),
        "train": train_table(data.get("train")),
        "conversion": conversion_table(data.get("conversion", [])),
        "deploy": deploy_table(data.get("deploy", [])),
        "int8": int8_text(data.get("deploy", [])),
    }


def markdown(data: dict) -> str:
    """The whole report as one Markdown document (what ``keras-dmr bench`` prints)."""
    titles = {
        "machine": "Machine and protocol",
        "targets": "Targets",
        "families": "Inference throughput, families (images/s)",
        "speedup": "Speed-up of the plain form over the residual form",
        "efficiency": "Achieved GFLOP/s (share of the matrix-product peak)",
        "peers": "ImageNet peers (images/s)",
        "training": "Training step: Table 2 pairs",
        "train": "Training throughput per backend and dtype policy (images/s)",
        "conversion": "Conversion cost (to_plain, verified)",
        "deploy": "Deployment forms: residual, plain, pruned plain × engines × float32/int8",
        "int8": "Does int8 pay? Plain int8 against plain float32 per engine",
    }
    parts = ["# keras_dmr benchmark", ""]
    for name, text in sections(data).items():
        parts += [f"## {titles[name]}", "", text, ""]
    return "\n".join(parts)


# -------------------------------------------------------------------------------------- charts
def plot_speedup(data: dict, path: str | Path) -> str | None:
    """Bars: plain/residual throughput per model and engine (1 = no change)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = speedups(data)
    if not rows:
        return None
    engines = [e for e in ENGINES if any(e in r["speedup"] for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.2))
    width = 0.8 / max(1, len(engines))
    for i, e in enumerate(engines):
        xs = [j + (i - (len(engines) - 1) / 2) * width for j in range(len(rows))]
        ys = [r["speedup"].get(e, 0.0) for r in rows]
        ax.bar(xs, ys, width, label=engine_label(e, _backend(data)))
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["model"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("plain / residual throughput")
    m = data["machine"]
    batch = data["inference"][0]["batch_size"] if data["inference"] else "?"
    gpus = [g["name"] for g in m.get("gpu_details", [])]
    where = gpus[0] if gpus else f"{m['cpu']}, {m['cores']} cores"
    ax.set_title(f"Speed-up of the plain form ({where}, batch {batch})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_accuracy(data: dict, path: str | Path, engine: str = "keras") -> str | None:
    """Published CIFAR-10 accuracy against measured throughput; residual (o) → plain (^)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[str, dict[str, dict]] = {}
    for g in data["inference"]:
        for r in g["results"]:
            if r["engine"] == engine and r.get("accuracy") is not None and "images_per_s" in r:
                points.setdefault(r["model"], {})[r["form"]] = r
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (model, forms) in enumerate(points.items()):
        color = f"C{i % 10}"
        xs = [forms[f]["images_per_s"] for f in ("residual", "plain") if f in forms]
        acc = next(iter(forms.values()))["accuracy"]
        if len(xs) == 2:
            ax.annotate(
                "", (xs[1], acc), (xs[0], acc), arrowprops=dict(arrowstyle="->", color="grey")
            )
        for f, marker in (("residual", "o"), ("plain", "^")):
            if f in forms:
                ax.scatter([forms[f]["images_per_s"]], [acc], marker=marker, s=40, color=color)
        ax.annotate(model, (xs[0], acc), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel(f"images/s ({engine_label(engine, _backend(data))}, measured here)")
    ax.set_ylabel("CIFAR-10 top-1 (%), published")
    ax.set_title("Accuracy against throughput: residual (o) → plain (^)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_deploy(data: dict, path: str | Path) -> str | None:
    """One panel per family: throughput of every form per engine and precision, as a ratio to
    the family's residual Keras float32 model (1 = as fast); a form its engine could not run
    has no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keras_dmr.bench.deploy import ENGINE_NAMES, without_unpruned

    groups = [without_unpruned(g) for g in data.get("deploy") or []]
    if not groups:
        return None
    forms = ("residual", "plain", "pruned plain")
    fig, axes = plt.subplots(
        len(groups), 1, figsize=(10.0, 2.3 * len(groups) + 0.6), squeeze=False, sharex=True
    )
    timed = [[r for r in g["rows"] if "ratio" in r and r["engine"] != "keras"] for g in groups]
    # The panels share their x axis: every panel has every slot any family has, in one order.
    slots = sorted(
        {(r["engine"], r["precision"]) for rows in timed for r in rows},
        key=lambda s: (list(ENGINE_NAMES).index(s[0]), s[1]),
    )
    for ax, g, rows in zip(axes[:, 0], groups, timed, strict=True):
        width = 0.8 / len(forms)
        for i, form in enumerate(forms):
            by = {(r["engine"], r["precision"]): r["ratio"] for r in rows if r["form"] == form}
            xs = [j + (i - 1) * width for j in range(len(slots))]
            ax.bar(xs, [by.get(s, 0.0) for s in slots], width, label=form, color=f"C{i}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(slots)))
        labels = [ENGINE_NAMES[e].replace(" (", "\n(") + "\n" + p for e, p in slots]
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("× residual Keras", fontsize=8)
        ax.set_title(g["family"], fontsize=9)
    axes[0, 0].legend(fontsize=8, ncol=3)
    m = data["machine"]
    fig.suptitle(
        f"Deployment forms, throughput at batch {groups[0]['batch_size']} "
        f"({m['cpu']}, {m['cores']} cores)",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return str(path)


def write_outputs(data: dict, directory: str | Path, *, prefix: str = "") -> dict[str, str]:
    """JSON, Markdown and the charts of one run into ``directory``; their paths."""
    directory = Path(directory)
    paths = {"json": directory / f"{prefix}benchmarks.json"}
    write_json(data, paths["json"])
    paths["markdown"] = directory / f"{prefix}benchmarks.md"
    write_text(markdown(data), paths["markdown"])
    for name, fn in CHART_PLOTS.items():
        written = fn(data, directory / f"{prefix}{CHARTS[name]}")
        if written:
            paths[name] = Path(written)
    return {k: str(v) for k, v in paths.items()}


CHART_PLOTS = {"speedup": plot_speedup, "accuracy": plot_accuracy, "deploy": plot_deploy}


def regenerate(
    json_path: str | Path, docs_dir: str | Path = "docs", *, prefix: str = "bench"
) -> None:
    """Rewrite every ``<prefix>-*`` section of ``docs_dir/benchmarks.md`` from one result and
    redraw its charts (``benchmarks_speedup.png`` for ``bench``, ``benchmarks_gpu_speedup.png``
    for ``bench-gpu``, and so on)."""
    from keras_dmr.utils.markdown import replace_section

    data = json.loads(Path(json_path).read_text())
    docs = Path(docs_dir)
    doc = docs / "benchmarks.md"
    text = doc.read_text()
    for name, content in sections(data).items():
        if name not in PER_MACHINE:
            text = replace_section(text, f"{prefix}-{name}", content)
    write_text(text, doc)
    stem = prefix.removeprefix("bench").strip("-")
    for name, fn in CHART_PLOTS.items():
        chart = CHARTS[name] if not stem else CHARTS[name].replace("_", f"_{stem}_", 1)
        fn(data, docs / chart)


def deploy_machine_text(data: dict, stem: str) -> str:
    """One machine's deploy run: does int8 pay, every row, and its chart
    (``benchmarks_deploy_<stem>.png``, drawn by :func:`regenerate_per_machine`)."""
    groups = data.get("deploy", [])
    if not groups:
        return deploy_table(groups)
    chart = f"![Deployment forms per family on this machine](benchmarks_deploy_{stem}.png)"
    return "\n\n".join((int8_text(groups), deploy_table(groups), chart))


def per_machine_text(name: str, results: dict[str, dict]) -> str:
    """Section ``name`` of every result (by the stem its file name's ``*`` matched), each
    under the machine and day it ran on."""
    parts = []
    for stem, data in results.items():
        m = data["machine"]
        flags = ", ".join(m.get("cpu_flags", [])) or "no AVX2/AVX-512/AMX flags"
        parts += [
            f"**{m['cpu']}** ({flags}), {m['cores']} cores, {data.get('started_utc', '?')[:10]}:",
            "",
            PER_MACHINE[name][1](data, stem),
            "",
        ]
    return "\n".join(parts).strip() or "_not measured_"


def per_machine_results(docs_dir: str | Path, name: str) -> dict[str, dict]:
    """Every result under ``docs_dir/data`` that section ``name`` of :data:`PER_MACHINE`
    shows, by the stem its file name's ``*`` matched, in file-name order."""
    pattern = PER_MACHINE[name][0]
    prefix, suffix = pattern.split("*")
    return {
        p.name.removeprefix(prefix).removesuffix(suffix): json.loads(p.read_text())
        for p in sorted((Path(docs_dir) / "data").glob(pattern))
    }


def regenerate_per_machine(docs_dir: str | Path = "docs") -> list[str]:
    """Rewrite each :data:`PER_MACHINE` section of ``docs_dir/benchmarks.md`` (``bench-NAME``)
    from every matching JSON under ``docs_dir/data`` and draw each deploy run's chart beside the
    page; the files read."""
    from keras_dmr.utils.markdown import replace_section

    docs = Path(docs_dir)
    doc = docs / "benchmarks.md"
    text, read = doc.read_text(), []
    for name, (pattern, _) in PER_MACHINE.items():
        results = per_machine_results(docs, name)
        text = replace_section(text, f"bench-{name}", per_machine_text(name, results))
        read += [str(docs / "data" / pattern.replace("*", stem)) for stem in results]
    for stem, data in per_machine_results(docs, "deploy-machines").items():
        plot_deploy(data, docs / f"benchmarks_deploy_{stem}.png")
    write_text(text, doc)
    return read


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keras_dmr.bench.report", description=__doc__)
    parser.add_argument("json", nargs="?", default="docs/data/benchmarks_cpu.json")
    parser.add_argument(
        "--gpu",
        metavar="JSON",
        help="a GPU run for the bench-gpu-* sections (default: docs/data/benchmarks_gpu.json "
        "when it exists and the docs have those sections)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="PART",
        help="first merge these results of one machine (runs split by --sections) into JSON",
    )
    parser.add_argument("--docs", default="docs", help="directory of benchmarks.md")
    args = parser.parse_args(argv)
    if args.merge:
        from keras_dmr.bench.targets import merge

        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        write_json(merge(parts), args.json)
        print(f"merged {len(parts)} results into {args.json}")
        return 0
    regenerate(args.json, args.docs)
    print(f"regenerated {Path(args.docs) / 'benchmarks.md'} from {args.json}")
    for path in regenerate_per_machine(args.docs):
        print(f"and its per-machine sections from {path}")
    gpu = args.gpu
    doc = Path(args.docs) / "benchmarks.md"
    if gpu is None and "<!-- BEGIN bench-gpu-" in doc.read_text():
        default = Path(args.docs) / "data" / "benchmarks_gpu.json"
        gpu = str(default) if default.exists() else None
    if gpu:
        regenerate(gpu, args.docs, prefix="bench-gpu")
        print(f"regenerated its GPU sections from {gpu}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
