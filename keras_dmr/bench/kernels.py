"""Which kernels an engine runs for an exported file, from the engine's own profiler.

An int8 file is only faster when its convolutions run as int8 kernels with nothing float
between them; a quantizer that cannot place a quantize/dequantize pair around an operator
leaves a float round trip after every convolution, and the file runs no faster than float32.
The profiles say which, per operator:

* ONNX Runtime: the session's own profiler (``SessionOptions.enable_profiling``), kernel time per
  operator type of the optimised graph (``QLinearConv``, ``DequantizeLinear``, ``Mul`` …).
* OpenVINO: the compiled model's performance counters (``PERF_COUNT``), time per node type and
  the kernel OpenVINO chose for it (``Convolution:jit_avx2_I8``, ``FakeQuantize:jit_avx2_f32``);
  the kernel name's suffix is the precision it computes in.

LiteRT's Python interpreter has no per-operator profiler. What it does show is its execution
plan: after XNNPACK's delegate takes the operators it can run, each run of them is one
``DELEGATE`` node; :func:`litert_plan` reads which convolutions and products ended up inside
XNNPACK and which operators run outside it, in LiteRT's own kernels. That says whether an int8
file's products run in XNNPACK's int8 kernels, not how fast they are.
"""

from __future__ import annotations

import collections
import json
import tempfile
from pathlib import Path

import numpy as np

from keras_dmr.export.onnx import onnx_session
from keras_dmr.export.serving import INPUT_NAME

# The int8 arithmetic that an int8 file exists for: convolutions and matrix products.
# ONNX Runtime fuses its QDQ graphs into these operators.
ORT_INT8_PRODUCTS = ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger")
# The float32 convolutions and matrix products they replace (ONNX Runtime's optimised graph
# names its fused and NCHWc-blocked convolutions Conv or FusedConv).
ORT_FLOAT_PRODUCTS = (
    "Conv",
    "FusedConv",
    "NhwcFusedConv",
    "Gemm",
    "FusedGemm",
    "MatMul",
    "FusedMatMul",
)
# Operators that move values between float and int8: time there is time int8 did not save.
ORT_CONVERSIONS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
# OpenVINO names a kernel by the precision it reads (``jit_avx2_I8``); its products are these
# node types (an elementwise kernel reading the uint8 images is not int8 arithmetic).
OPENVINO_PRODUCTS = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul")
OPENVINO_INT8_SUFFIXES = ("_i8", "_u8")
KERNEL_PROFILE_ENGINES = ("onnx", "openvino", "openvino_ir")
# LiteRT's convolutions and matrix products (builtin operator names).
LITERT_PRODUCTS = (
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "TRANSPOSE_CONV",
    "FULLY_CONNECTED",
    "BATCH_MATMUL",
)


def onnx_kernel_times(
    path: str | Path, images: np.ndarray, *, threads: int | None = None, runs: int = 3
) -> dict[str, float]:
    """Seconds per run spent in each operator type when ONNX Runtime runs ``path`` on
    ``images`` (after one untimed run), from the session's profiler."""
    with tempfile.TemporaryDirectory(prefix="keras_dmr_profile_") as tmp:
        session = onnx_session(path, threads, cpu_only=True, profile_prefix=str(Path(tmp) / "p"))
        session.run(None, {INPUT_NAME: images})  # its events are skipped below
        for _ in range(runs):
            session.run(None, {INPUT_NAME: images})
        events = json.loads(Path(session.end_profiling()).read_text())
    runs_seen = [e for e in events if e.get("name") == "model_run"]
    if len(runs_seen) < runs + 1:
        raise RuntimeError(f"ONNX Runtime's profile of {path} has {len(runs_seen)} runs")
    first_end = runs_seen[0]["ts"] + runs_seen[0]["dur"]
    times: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > first_end:
            times[e["args"]["op_name"]] += e["dur"] * 1e-6 / runs
    return dict(times)


def openvino_kernel_times(
    path: str | Path,
    images: np.ndarray,
    *,
    threads: int | None = None,
    precision_hint: str = "f32",
    runs: int = 3,
) -> dict[str, float]:
    """Seconds per run spent in each ``node type:kernel`` when OpenVINO runs ``path`` (an
    ``.xml`` IR or an ``.onnx`` file) on ``images``, from its performance counters (the
    counters of the last run, averaged by running ``runs`` times after one untimed run)."""
    import openvino as ov

    config = {"PERF_COUNT": True, "INFERENCE_PRECISION_HINT": precision_hint}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    request = ov.Core().compile_model(str(path), "CPU", config).create_infer_request()
    request.infer({INPUT_NAME: images})
    times: collections.Counter = collections.Counter()
    for _ in range(runs):
        request.infer({INPUT_NAME: images})
        for info in request.get_profiling_info():
            if info.status == ov.ProfilingInfo.Status.EXECUTED:
                seconds = info.real_time.total_seconds()
                times[f"{info.node_type}:{info.exec_type}"] += seconds / runs
    return dict(times)


def kernel_times(engine: str, path: str | Path, images: np.ndarray, **kw) -> dict[str, float]:
    """:func:`onnx_kernel_times` for ``engine="onnx"``, :func:`openvino_kernel_times` for
    ``"openvino"`` (the ONNX file) and ``"openvino_ir"``."""
    if engine == "onnx":
        kw.pop("precision_hint", None)
        return onnx_kernel_times(path, images, **kw)
    if engine in ("openvino", "openvino_ir"):
        return openvino_kernel_times(path, images, **kw)
    raise ValueError(f"no kernel profile for engine {engine!r}; valid: {KERNEL_PROFILE_ENGINES}")


def is_int8_kernel(engine: str, name: str) -> bool:
    """Whether the profile entry ``name`` of ``engine`` is an int8 convolution or matrix
    product."""
    if engine == "onnx":
        return name in ORT_INT8_PRODUCTS
    node_type = name.split(":")[0]
    return name.lower().endswith(OPENVINO_INT8_SUFFIXES) and node_type.startswith(OPENVINO_PRODUCTS)


def is_product_kernel(engine: str, name: str) -> bool:
    """Whether the profile entry ``name`` of ``engine`` is a convolution or matrix product, in
    any precision."""
    if engine == "onnx":
        return name in ORT_INT8_PRODUCTS or name in ORT_FLOAT_PRODUCTS
    return name.split(":")[0].startswith(OPENVINO_PRODUCTS)


def int8_share(engine: str, times: dict[str, float]) -> float:
    """The fraction of the profiled time spent in int8 convolutions and matrix products."""
    total = sum(times.values())
    int8 = sum(t for name, t in times.items() if is_int8_kernel(engine, name))
    return int8 / total if total else 0.0


def top_kernels(times: dict[str, float], n: int = 4) -> list[tuple[str, float]]:
    """The ``n`` entries that took the most time, each with its fraction of the total."""
    total = sum(times.values()) or 1.0
    ranked = sorted(times.items(), key=lambda kv: -kv[1])[:n]
    return [(name, t / total) for name, t in ranked]


def profile_row(engine: str, path: str | Path, images: np.ndarray, **kw) -> dict:
    """What the deploy benchmark records of one file: the profiled seconds per run, those in
    convolutions and matrix products (any precision), the share of time in int8 ones
    (:func:`int8_share`) and the four costliest entries (``[name, share]``)."""
    times = kernel_times(engine, path, images, **kw)
    return {
        "profiled_seconds": sum(times.values()),
        "product_seconds": sum(t for n, t in times.items() if is_product_kernel(engine, n)),
        "int8_kernel_share": int8_share(engine, times),
        "top_kernels": [[name, share] for name, share in top_kernels(times)],
    }


def litert_plan(path: str | Path, *, delegate: bool = True) -> dict:
    """Which operators of the LiteRT file ``path`` XNNPACK's delegate runs, from the
    interpreter's node list after delegation (``delegate=False``: without it, LiteRT's own
    kernels only): the number of convolutions and matrix products, how many of them run in
    XNNPACK, and the operators left outside it (``{name: count}``).

    A ``DELEGATE`` node replaces the nodes that compute its output tensors from its input
    tensors; those are found by walking back from its outputs until its inputs."""
    from keras_dmr.export.litert import interpreter

    it = interpreter(path, threads=1, delegate=delegate)
    it.allocate_tensors()
    nodes = it._get_ops_details()  # LiteRT's Python API has no public node list
    plain = [n for n in nodes if n["op_name"] != "DELEGATE"]
    producer = {int(t): n["index"] for n in plain for t in n["outputs"]}
    inside: set[int] = set()
    for node in nodes:
        if node["op_name"] != "DELEGATE":
            continue
        given = {int(t) for t in node["inputs"]}
        todo = [int(t) for t in node["outputs"]]
        while todo:
            tensor = todo.pop()
            index = producer.get(tensor)
            if tensor in given or index is None or index in inside:
                continue
            inside.add(index)
            todo += [int(t) for t in nodes[index]["inputs"] if int(t) >= 0]
    products = [n for n in plain if n["op_name"] in LITERT_PRODUCTS]
    outside = collections.Counter(n["op_name"] for n in plain if n["index"] not in inside)
    return {
        "products": len(products),
        "xnnpack_products": sum(n["index"] in inside for n in products),
        "outside_xnnpack": dict(sorted(outside.items())),
    }
