"""Does int8 pay? A model's int8 file against its float32 file in the same engine, per family,
from the deploy benchmark's rows, and what holds a slow one back, read from the engines' own
profiles.

The target (issue 31) is int8 at least :data:`TARGET` times as fast as float32 in every engine.
Where a pair falls short, the profiles of both files (:mod:`keras_dmr.bench.kernels`, run
apart from the timing) tell two causes apart:

* **float work left in the int8 file**: less than :data:`INT8_SHARE` of its profiled time is
  in int8 convolutions and matrix products; the costliest other kernels are named;
* **the int8 products are not much faster than float32 ones on this CPU**: the time the
  float32 file spends in its convolutions and products over the int8 file's, e.g. on a CPU
  without VNNI (AVX2 only), where an int8 multiply-accumulate takes more instructions.

LiteRT's Python interpreter has no per-kernel profiler; its execution plan
(:func:`keras_dmr.bench.kernels.litert_plan`) tells the first cause apart — products left
outside XNNPACK's int8 kernels, in LiteRT's reference ones — and, where every product is inside,
names the second without timing the products apart from the file.

What it cannot say: the profiles run the batch the benchmark timed, three times, apart from
the timing; their seconds are not the table's.
"""

from __future__ import annotations

from collections.abc import Sequence

from keras_dmr.bench.deploy import ENGINE_NAMES, find
from keras_dmr.bench.kernels import KERNEL_PROFILE_ENGINES, is_int8_kernel

TARGET = 1.3  # int8 ÷ float32 throughput, same form and engine
INT8_SHARE = 0.75  # below it, float work left in the int8 file is the cause named
INT8_ENGINES = ("onnx", "openvino", "openvino_ir", "litert")


def gains(groups: Sequence[dict], form: str = "plain") -> list[dict]:
    """One record per family and engine that ran ``form`` in both float32 and int8: the two
    throughputs, their ratio, whether it meets :data:`TARGET`, the int8 file's share of time
    in int8 products, the products' own speed-up and the cause (:func:`cause`)."""
    out = []
    for group in groups:
        for engine in INT8_ENGINES:
            f = find(group["rows"], form, engine, "float32")
            q = find(group["rows"], form, engine, "int8")
            if f is None or q is None:
                continue
            record = {
                "family": group["family"],
                "form": form,
                "engine": engine,
                "float32_images_per_s": f["images_per_s"],
                "int8_images_per_s": q["images_per_s"],
                "gain": q["images_per_s"] / f["images_per_s"],
                "int8_kernel_share": q.get("int8_kernel_share"),
                "product_gain": (
                    f["product_seconds"] / q["product_seconds"]
                    if f.get("product_seconds") and q.get("product_seconds")
                    else None
                ),
            }
            record["meets"] = record["gain"] >= TARGET
            record["cause"] = cause(record, q)
            out.append(record)
    return out


def cause(record: dict, int8_row: dict) -> str:
    """What keeps ``record``'s int8 file under :data:`TARGET`, from the profiles ("" when it
    meets it)."""
    if record["meets"]:
        return ""
    engine = record["engine"]
    if engine == "litert":
        return _litert_cause(int8_row)
    if engine not in KERNEL_PROFILE_ENGINES:
        return f"{ENGINE_NAMES[engine]} has no kernel profiler here"
    share = record["int8_kernel_share"]
    if share is None:
        return "not profiled"
    if share < INT8_SHARE:
        others = [
            f"{name} {100 * part:.0f}%"
            for name, part in int8_row.get("top_kernels", [])
            if not is_int8_kernel(engine, name)
        ]
        return f"float work left: {100 * (1 - share):.0f}% of its time outside int8 products" + (
            f" ({', '.join(others)})" if others else ""
        )
    if record["product_gain"] is None:
        return f"{100 * share:.0f}% of its time in int8 products; float32 file not profiled"
    return (
        f"the int8 products themselves: {100 * share:.0f}% of its time is in them, and they "
        f"run {record['product_gain']:.2f}× as fast as the float32 file's on this CPU"
    )


def _litert_cause(int8_row: dict) -> str:
    if "products" not in int8_row:
        return "not profiled"
    n, inside = int8_row["products"], int8_row["xnnpack_products"]
    outside = ", ".join(
        f"{name}×{count}" if count > 1 else name
        for name, count in int8_row["outside_xnnpack"].items()
    )
    if inside < n:
        return (
            f"products left to LiteRT's reference kernels: {n - inside} of {n} convolutions and "
            f"products run outside XNNPACK (outside it: {outside})"
        )
    return (
        f"the int8 products themselves: all {n} convolutions and products run in XNNPACK's int8 "
        f"kernels (outside it: {outside or 'nothing'}); LiteRT times no kernel apart from the file"
    )


def table(groups: Sequence[dict]) -> str:
    """The plain form's int8 ÷ float32 per family and engine, and the cause where short."""
    records = gains(groups)
    if not records:
        return "_not measured in this run_ (`keras-dmr bench --sections deploy`)"
    lines = [
        "| family | engine | plain float32 images/s | plain int8 images/s | int8 ÷ float32 "
        f"| int8 kernels | int8 ÷ float32 products | ≥ {TARGET:g}×? what holds it back |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        share, product = r["int8_kernel_share"], r["product_gain"]
        lines.append(
            f"| {r['family']} | {ENGINE_NAMES[r['engine']]} | {r['float32_images_per_s']:,.0f} "
            f"| {r['int8_images_per_s']:,.0f} | {r['gain']:.2f}× | "
            + ("–" if share is None else f"{100 * share:.0f}%")
            + " | "
            + ("–" if product is None else f"{product:.2f}×")
            + " | "
            + ("yes" if r["meets"] else f"no: {r['cause']}")
            + " |"
        )
    return "\n".join(lines)


def summary(groups: Sequence[dict]) -> str:
    """One sentence per engine: how many families meet :data:`TARGET`."""
    records = gains(groups)
    parts = []
    for engine in INT8_ENGINES:
        mine = [r for r in records if r["engine"] == engine]
        if mine:
            met = [r["family"] for r in mine if r["meets"]]
            parts.append(
                f"{ENGINE_NAMES[engine]}: {len(met)} of {len(mine)} families"
                + (f" ({', '.join(met)})" if met else "")
            )
    return (
        f"Plain int8 at least {TARGET:g}× plain float32 — " + "; ".join(parts) + "."
        if parts
        else ""
    )
