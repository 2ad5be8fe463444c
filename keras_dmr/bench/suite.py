"""The benchmark run: the machine's matrix-product peak, inference of every family (residual
against plain, in TensorFlow, XLA, a SavedModel and ONNX Runtime), the ImageNet peers, the
training step of Table 2's pairs, training throughput per Keras backend and dtype policy
(:mod:`keras_dmr.bench.train_throughput`) — each group timed A B A B — and the targets checked.

:func:`run` returns one JSON-ready dict (see ``docs/benchmarks.md`` for its fields). Speeds are
images per second from the median over repeats of the mean time per batch; "GFLOP/s" counts two
floating-point operations per multiply-accumulate of :func:`keras_dmr.analysis.count_flops`.
Inference and the Table 2 steps are float32 (the deploy section adds int8 and bfloat16 files,
the train section bfloat16 training); it cannot pin threads or clocks.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np

from keras_dmr.bench import conversion, deploy, train_throughput, zoo
from keras_dmr.bench.engines import ENGINES, available_engines, runner
from keras_dmr.bench.targets import evaluate_targets
from keras_dmr.utils import keras_internals
from keras_dmr.utils.timing import (
    default_device,
    inference_fn,
    interleaved,
    load_average,
    machine_description,
    train_step_fn,
)

FLOPS_PER_MAC = 2
SECTIONS = ("families", "peers", "training", "train", "conversion", "deploy")
DEFAULT_ENGINES = ("keras", "xla", "onnx")
# Graph ops that write no new activation (views, variable reads, constants).
_NO_TRAFFIC = {
    "Const",
    "ExpandDims",
    "Identity",
    "IdentityN",
    "NoOp",
    "Placeholder",
    "ReadVariableOp",
    "Reshape",
    "Squeeze",
    "StopGradient",
}


@dataclasses.dataclass
class Settings:
    """How much to time. ``warmup``/``timed`` count batches per candidate; the timed batches
    are split into ``repeats`` interleaved rounds (``timed // repeats`` batches each). The
    ``imagenet_*`` values apply to the 224×224 peers and the ``train_*`` values to training
    steps; each defaults to the main value. The defaults are the RMNet paper's protocol."""

    batch_size: int = 128
    warmup: int = 50
    timed: int = 50
    repeats: int = 5
    imagenet_batch_size: int | None = None
    imagenet_warmup: int | None = None
    imagenet_timed: int | None = None
    train_batch_size: int = 64
    train_warmup: int | None = None
    train_timed: int | None = None
    engines: tuple[str, ...] = DEFAULT_ENGINES
    sections: tuple[str, ...] = SECTIONS
    peak_size: int = 4096
    seed: int = 0
    quick: bool = False
    deploy_families: tuple[str, ...] | None = None  # deploy.FAMILY_IDS; None: all (quick: one)

    def __post_init__(self):
        for name in ("batch_size", "timed", "repeats", "train_batch_size", "peak_size"):
            _check_int(name, getattr(self, name), 1)
        _check_int("warmup", self.warmup, 0)
        for name in ("imagenet_batch_size", "imagenet_timed", "train_timed"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        for name in ("imagenet_warmup", "train_warmup"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0)
        for name in ("timed", "imagenet_timed", "train_timed"):
            value = getattr(self, name)
            if value is not None and value < self.repeats:
                raise ValueError(
                    f"`{name}` must be >= `repeats` ({self.repeats}): the timed batches are "
                    f"split into that many rounds; got {value}"
                )
        self.engines = _check_subset("engines", self.engines, ENGINES)
        self.sections = _check_subset("sections", self.sections, SECTIONS)
        if self.deploy_families is not None:
            self.deploy_families = _check_subset(
                "deploy_families", self.deploy_families, tuple(deploy.FAMILY_IDS)
            )

    def protocol(self, kind: str) -> dict:
        """Batch size, warm-up batches, timed batches per round and rounds for ``kind``
        (``"families"``, ``"peers"`` or ``"training"``)."""
        batch, warmup, timed = self.batch_size, self.warmup, self.timed
        if kind == "peers":
            batch = self.imagenet_batch_size or batch
            warmup = warmup if self.imagenet_warmup is None else self.imagenet_warmup
            timed = self.imagenet_timed or timed
        elif kind == "training":
            batch = self.train_batch_size
            warmup = warmup if self.train_warmup is None else self.train_warmup
            timed = self.train_timed or timed
        return {
            "batch_size": batch,
            "warmup": warmup,
            "iters": timed // self.repeats,
            "repeats": self.repeats,
        }


def quick_settings(**overrides) -> Settings:
    """Settings that exercise every section in about a minute; the figures mean little."""
    values = dict(
        batch_size=16,
        warmup=1,
        timed=2,
        repeats=2,
        imagenet_batch_size=2,
        imagenet_warmup=1,
        imagenet_timed=2,
        train_batch_size=16,
        train_warmup=1,
        train_timed=2,
        peak_size=1024,
        quick=True,
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}; got {value!r}")


def _check_subset(name: str, values, valid: Sequence[str]) -> tuple[str, ...]:
    values = tuple(values)
    if not values or any(v not in valid for v in values) or len(set(values)) != len(values):
        raise ValueError(
            f"`{name}` must be distinct values among {', '.join(valid)}; got {list(values)}"
        )
    return values


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- analysis
def activation_bytes(model: keras.Model) -> int | None:
    """Bytes of float tensors the ops of ``model``'s inference graph write for one image
    (TensorFlow backend; None on others).

    Summed over the TensorFlow graph as traced (before Grappler fuses ops; views, constants and
    variable reads excluded): a proxy for the memory traffic that additions, concatenations,
    splits and unfolded BatchNorms add to the convolutions' own outputs.
    """
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    shape = (1, *model.inputs[0].shape[1:])

    def forward(t):
        return model(t, training=False)

    graph = (
        tf.function(forward, autograph=False)
        .get_concrete_function(tf.TensorSpec(shape, tf.float32))
        .graph
    )
    total = 0
    for op in graph.get_operations():
        if op.type in _NO_TRAFFIC:
            continue
        for out in op.outputs:
            if out.dtype.is_floating and out.shape.is_fully_defined():
                total += out.shape.num_elements() * out.dtype.size
    return int(total)


def is_dense(model: keras.Model) -> bool:
    """Whether every convolution is dense (no groups, no depthwise)."""
    for layer in keras_internals.all_layers(model):
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            return False
        if isinstance(layer, keras.layers.Conv2D) and layer.groups != 1:
            return False
    return True


def describe(model: keras.Model) -> dict:
    from keras_dmr.analysis.flops import count_flops

    traffic = activation_bytes(model)
    return {
        "params": int(model.count_params()),
        "macs": int(count_flops(model)),
        "activation_mb": None if traffic is None else traffic / 2**20,
        "dense": is_dense(model),
        "layers": len(model.layers),
    }


# -------------------------------------------------------------------------------------- peak
def _onnx_matmul(n: int, workdir: Path) -> Callable[[], object]:
    import onnx
    from onnx import TensorProto, helper

    from keras_dmr.export.onnx import onnx_session

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8  # opset 17's IR version: every ONNX Runtime since 1.13 reads it
    path = workdir / "matmul.onnx"
    onnx.save(proto, str(path))
    session = onnx_session(path)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype("float32") for _ in range(2))
    return lambda: session.run(["c"], {"a": a, "b": b})[0][0, 0]


class PeakMeter:
    """An n×n float32 matrix product (2n³ flops), ready to be timed again and again: in the
    Keras backend (``tf.linalg.matmul`` in a ``tf.function``, or a jitted ``jax.numpy.matmul``,
    on the default device) and in ONNX Runtime (``MatMul``), interleaved. The machine's peak
    is the faster of the two."""

    def __init__(self, n: int, workdir: Path):
        self.n = n
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((n, n)).astype("float32") for _ in range(2))
        if keras.backend.backend() == "jax":
            import jax

            device = jax.devices()[0]
            a, b = jax.device_put(a, device), jax.device_put(b, device)
            jax_matmul = jax.jit(lambda x, y: jax.numpy.matmul(x, y)[0, 0])
            self.candidates = {"jax": lambda: np.asarray(jax_matmul(a, b))}
        else:
            import tensorflow as tf

            with tf.device(default_device()):
                a, b = tf.identity(a), tf.identity(b)
            matmul = tf.function(lambda x, y: tf.linalg.matmul(x, y)[0, 0], autograph=False)
            self.candidates = {"tensorflow": lambda: matmul(a, b).numpy()}
        try:
            self.candidates["onnxruntime"] = _onnx_matmul(n, workdir)
        except ImportError:
            pass
        except Exception as err:  # an ONNX Runtime that cannot run it: the backend's alone
            _log(f"peak: no ONNX Runtime product ({type(err).__name__}: {str(err)[:200]})")
        self.flops = 2.0 * n**3
        # About 0.3 s of work per round at 200 GFLOP/s: at least one product, at most 100.
        self.iters = min(100, max(1, int(6e10 // self.flops)))

    def measure(self, *, repeats: int = 5, warmup: int = 2) -> dict:
        timing = interleaved(self.candidates, warmup=warmup, iters=self.iters, repeats=repeats)
        result = {
            "size": self.n,
            "dtype": "float32",
            "flops_per_product": self.flops,
            "repeats": repeats,
            "products_per_repeat": self.iters,
        }
        for name, t in timing.items():
            result[f"{name}_gflops"] = self.flops / t["median_s"] / 1e9
            result[f"{name}_gflops_spread"] = [
                self.flops / t["max_s"] / 1e9,
                self.flops / t["min_s"] / 1e9,
            ]
        best = max(self.candidates, key=lambda name: result[f"{name}_gflops"])
        result["gflops"] = result[f"{best}_gflops"]
        result["framework"] = best
        return result


def measure_peak(n: int, workdir: Path, *, repeats: int = 5) -> dict:
    """GFLOP/s of an n×n float32 matrix product (see :class:`PeakMeter`), measured once."""
    return PeakMeter(n, workdir).measure(repeats=repeats)


# --------------------------------------------------------------------------------- inference
def _key(label: str, engine: str) -> str:
    return f"{label} | {engine}"


def _time_ready(fns: dict, protocol: dict, message: str, *, warm: bool = True) -> dict:
    """Call each of ``fns`` once (tracing and compilation, untimed) unless ``warm`` is False,
    then time them all A B A B by ``protocol``."""
    if warm:
        for fn in fns.values():
            fn()
    _log(message + " A B A B")
    return interleaved(
        fns, warmup=protocol["warmup"], iters=protocol["iters"], repeats=protocol["repeats"]
    )


def _throughput(timing: dict, batch: int) -> dict:
    return {
        "batch_ms": 1e3 * timing["median_s"],
        "images_per_s": batch / timing["median_s"],
        "images_per_s_spread": [batch / timing["max_s"], batch / timing["min_s"]],
    }


def run_inference_group(
    group: zoo.InferenceGroup,
    *,
    protocol: dict,
    engines: Sequence[str],
    peak_gflops: float | None = None,
    workdir: Path,
    seed: int = 0,
    meter: PeakMeter | None = None,
) -> dict:
    """Build every model (and plain form) of ``group``, prepare every engine, time them all
    interleaved; one record per (model, form, engine). A failing engine is recorded, not fatal.

    With a ``meter`` the matrix-product peak is measured just before and just after the timing
    and their mean replaces ``peak_gflops`` for this group's ``peak_fraction``."""
    from keras_dmr.convert import to_plain

    batch = protocol["batch_size"]
    engines = list(engines) + [e for e in group.extra_engines if e not in engines]
    engines = [e for e in engines if e in available_engines()]
    # Exports first, while this process holds the least memory.
    engines.sort(key=lambda e: e in ("keras", "xla"))
    candidates, records, keep = {}, [], []
    for index, spec in enumerate(group.models):
        _log(f"{group.name}: building {spec.label}")
        model = spec.build()
        forms = {}
        if "residual" in spec.forms:
            forms["residual"] = model
        conversion = None
        if "plain" in spec.forms:
            start = time.perf_counter()
            plain = to_plain(model)
            conversion = dict(plain.conversion_report, seconds=time.perf_counter() - start)
            forms["plain"] = plain
        keep.append(model)
        for form, m in forms.items():
            info = describe(m)
            label = spec.form_label(form)
            for engine in engines:
                record = {
                    "group": group.name,
                    "section": group.section,
                    "model": spec.label,
                    "label": label,
                    "form": form,
                    "engine": engine,
                    "input_shape": list(m.inputs[0].shape[1:]),
                    **info,
                    "accuracy": spec.accuracy,
                    "accuracy_dataset": spec.accuracy_dataset,
                    "accuracy_source": spec.accuracy_source,
                }
                if form == "plain":
                    record["max_relative_error"] = conversion["max_relative_error"]
                    record["conversion_s"] = conversion["seconds"]
                start = time.perf_counter()
                try:
                    stem = f"{index}_{form}_{m.name}"
                    fn = runner(engine, m, batch, workdir / group.section, seed=seed, stem=stem)
                    fn()  # tracing, compilation, session start-up: not timed
                except Exception as err:  # recorded: one engine failing must not end the run
                    record["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                    _log(f"{label} on {engine} failed: {record['error']}")
                    records.append(record)
                    continue
                record["setup_s"] = time.perf_counter() - start
                candidates[_key(label, engine)] = fn
                records.append(record)
            keep.append(m)
    peak = {}
    if meter is not None:
        peak["before"] = meter.measure(repeats=3, warmup=1)
    timing = _time_ready(
        candidates, protocol, f"{group.name}: timing {len(candidates)} candidates", warm=False
    )
    if meter is not None:
        peak["after"] = meter.measure(repeats=3, warmup=1)
        peak["gflops"] = (peak["before"]["gflops"] + peak["after"]["gflops"]) / 2
        peak_gflops = peak["gflops"]
    for record in records:
        t = timing.get(_key(record["label"], record["engine"]))
        if t is None:
            continue
        record.update(_throughput(t, batch))
        record["gflops"] = FLOPS_PER_MAC * record["macs"] * record["images_per_s"] / 1e9
        if peak_gflops:
            record["peak_fraction"] = record["gflops"] / peak_gflops
        record["samples_s"] = t["samples"]
    del candidates, keep
    return {
        "name": group.name,
        "section": group.section,
        "backend": keras.backend.backend(),
        **protocol,
        "peak": peak or None,
        "results": records,
    }


# ---------------------------------------------------------------------------------- training
def run_training_group(
    group: zoo.TrainingGroup, *, protocol: dict, inference_batch: int, seed: int = 0
) -> dict:
    """Training step (``protocol``) and TensorFlow-graph inference (batch ``inference_batch``)
    of every model, each timed interleaved; ratios for ``group.pairs``."""
    from keras_dmr.analysis.flops import count_flops

    models = {}
    for spec in group.models:
        _log(f"{group.name}: building {spec.label}")
        models[spec.label] = spec.build()
    batch = protocol["batch_size"]
    train = {label: train_step_fn(m, batch, seed) for label, m in models.items()}
    train_t = _time_ready(train, protocol, f"{group.name}: timing {len(train)} training steps")
    infer = {label: inference_fn(m, inference_batch, seed) for label, m in models.items()}
    infer_t = _time_ready(infer, protocol, f"{group.name}: timing {len(infer)} inference passes")
    results = {}
    for label, m in models.items():
        t, i = train_t[label], infer_t[label]
        results[label] = {
            "params": int(m.count_params()),
            "macs": int(count_flops(m)),
            "train_step_ms": 1e3 * t["median_s"],
            "train_step_spread_ms": [1e3 * t["min_s"], 1e3 * t["max_s"]],
            "train_samples_s": t["samples"],
            "inference_batch_ms": 1e3 * i["median_s"],
            "inference_spread_ms": [1e3 * i["min_s"], 1e3 * i["max_s"]],
            "inference_images_per_s": inference_batch / i["median_s"],
            "train_jit_compile": bool(m.jit_compile),
        }
    pairs = []
    for model, base in group.pairs:
        if model in results and base in results:
            pairs.append(
                {
                    "model": model,
                    "baseline": base,
                    "train_step_ratio": results[model]["train_step_ms"]
                    / results[base]["train_step_ms"],
                    "inference_time_ratio": results[model]["inference_batch_ms"]
                    / results[base]["inference_batch_ms"],
                    "train_ratio_per_round": [
                        a / b
                        for a, b in zip(
                            train_t[model]["samples"], train_t[base]["samples"], strict=True
                        )
                    ],
                }
            )
    del models, train, infer
    return {
        "name": group.name,
        **protocol,
        "inference_batch_size": inference_batch,
        "results": results,
        "pairs": pairs,
    }


# --------------------------------------------------------------------------------------- run
def run(
    settings: Settings,
    *,
    inference_groups: Sequence[zoo.InferenceGroup] | None = None,
    training_groups: Sequence[zoo.TrainingGroup] | None = None,
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """Run the benchmark; the groups default to :mod:`keras_dmr.bench.zoo`'s (quick ones with
    ``settings.quick``). ``on_progress`` receives the partial result after every group (to save
    it), so a long run that fails late keeps what it measured."""
    if inference_groups is None:
        inference_groups = (
            zoo.quick_inference_groups() if settings.quick else zoo.inference_groups()
        )
    if training_groups is None:
        training_groups = zoo.quick_training_groups() if settings.quick else zoo.training_groups()
    started = time.time()
    result = {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": {
            **machine_description(),
            "device": default_device(),
            "load_average_before": load_average(),
        },
        "settings": dataclasses.asdict(settings),
        "flops_per_mac": FLOPS_PER_MAC,
        "inference": [],
        "training": [],
    }
    result["settings"]["engines"] = list(settings.engines)
    result["settings"]["sections"] = list(settings.sections)

    def progress():
        result["duration_s"] = time.time() - started
        result["machine"]["load_average_after"] = load_average()
        if on_progress is not None:
            on_progress(result)

    unavailable = [e for e in settings.engines if e not in available_engines()]
    if unavailable:
        result["engines_unavailable"] = unavailable
        _log(f"not on the {keras.backend.backend()} backend: {', '.join(unavailable)}")
    quiet = _quiet_tensorflow()
    try:
        with tempfile.TemporaryDirectory(prefix="keras_dmr_bench_") as tmp:
            _run_sections(result, settings, inference_groups, training_groups, Path(tmp), progress)
    finally:
        quiet()
    result["targets"] = evaluate_targets(result)
    progress()
    return result


def _run_sections(result, settings, inference_groups, training_groups, workdir, progress):
    """Peak, then every inference group of the selected sections, then training."""
    _log(f"peak: {settings.peak_size}² float32 matrix product")
    meter = PeakMeter(settings.peak_size, workdir)
    result["peak"] = meter.measure()
    progress()
    for group in inference_groups:
        if group.section not in settings.sections:
            continue
        protocol = settings.protocol(group.section)
        result["inference"].append(
            run_inference_group(
                group,
                protocol=protocol,
                engines=settings.engines,
                workdir=workdir,
                seed=settings.seed,
                meter=meter,
            )
        )
        _cleanup()
        progress()
    if "training" in settings.sections:
        for group in training_groups:
            result["training"].append(
                run_training_group(
                    group,
                    protocol=settings.protocol("training"),
                    inference_batch=settings.batch_size,
                    seed=settings.seed,
                )
            )
            _cleanup()
            progress()
    if "train" in settings.sections:
        protocol = settings.protocol("training")
        result["train"] = train_throughput.run_section(
            quick=settings.quick,
            batch_size=protocol["batch_size"],
            warmup=protocol["warmup"],
            iters=protocol["iters"],
            repeats=protocol["repeats"],
            seed=settings.seed,
            log=_log,
        )
        progress()
    if "conversion" in settings.sections:
        result["conversion"] = conversion.run_section(quick=settings.quick, log=_log)
        progress()
    if "deploy" in settings.sections:
        result["deploy"] = deploy.run_section(
            quick=settings.quick,
            batch_size=settings.batch_size,
            repeats=settings.repeats,
            families=settings.deploy_families,
            log=_log,
        )
        progress()
    _log("peak again, at the end")
    result["peak_end"] = meter.measure()


def _quiet_tensorflow() -> Callable[[], None]:
    """Silence TensorFlow's retracing warnings (one tf.function per candidate is expected);
    returns what restores its log level. Nothing to do on other backends."""
    if keras.backend.backend() != "tensorflow":
        return lambda: None
    import tensorflow as tf

    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    return lambda: logger.setLevel(level)


def _cleanup() -> None:
    keras.backend.clear_session()
    gc.collect()
