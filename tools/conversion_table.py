"""The conversion table of ``docs/conversion.md``: every family, before and after ``to_plain``.

Run ``python -m tools.conversion_table`` to measure (minutes on 2 CPU cores) into
``docs/data/conversion.json`` and regenerate the table from it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

# name → (how to build it, a note for the table). Builders take no arguments and return a
# residual model with random weights and random BN statistics.
FAMILIES: dict[str, tuple[Callable, str]] = {}


def family(name: str, note: str = ""):
    def register(fn):
        FAMILIES[name] = (fn, note)
        return fn

    return register


def _random(model, seed=0):
    from keras_dmr.convert import randomize

    return randomize(model, seed)


@family("ResNet-56 (CIFAR)")
def _resnet56():
    import keras_dmr

    return _random(keras_dmr.ResNet(depth=56, compile=False))


@family("ResNet-98 (CIFAR, DMRNet-50's Table 2 partner)")
def _resnet98():
    import keras_dmr

    return _random(keras_dmr.ResNet(depth=98, compile=False))


@family("ResNet-18 (ImageNet, 224²)")
def _resnet18():
    import keras_dmr

    return _random(keras_dmr.ResNet(depth=18, variant="imagenet", compile=False))


@family("ResNet-50 (ImageNet, 224²)")
def _resnet50():
    import keras_dmr

    return _random(keras_dmr.ResNet(depth=50, variant="imagenet", compile=False))


@family("DMRNet-50, K=2 (CIFAR)")
def _dmrnet50():
    import keras_dmr

    return _random(keras_dmr.DMRNet(depth=50, compile=False))


@family("DMRNet-26, K=4 (CIFAR)")
def _dmrnet26_k4():
    import keras_dmr

    return _random(keras_dmr.DMRNet(depth=26, branches=4, compile=False))


@family("DMRNet-50, identity mapping, K=2 (CIFAR)")
def _dmrnet50_identity():
    import keras_dmr

    return _random(keras_dmr.DMRNet(depth=50, mapping="identity", compile=False))


@family("DVANet-50, K=2 (CIFAR)")
def _dvanet50():
    import keras_dmr

    return _random(keras_dmr.DVANet(depth=50, compile=False))


for _ratio in (0.0, 0.25, 0.5, 0.75):

    def _repvgg(ratio=_ratio):
        import keras_dmr

        return _random(keras_dmr.RepVGG(depth=21, reserve_ratio=ratio, compile=False))

    family(f"RepVGG-21, reserve ratio {_ratio:g} (CIFAR)")(_repvgg)


@family("RMNet 26×3_32 (CIFAR)", "Table 4 layer by layer")
def _rmnext26():
    import keras_dmr

    return _random(keras_dmr.RMNeXt(depth=26, expansion=3, channels_per_group=32, compile=False))


@family("MobileNetV2 → RMNetV1 (CIFAR, Sec. 5.3)", "projection and expansion fused (Eq. 5)")
def _mobilenet_cifar():
    import keras_dmr

    return _random(keras_dmr.MobileNetV2(variant="cifar", compile=False))


@family("keras.applications.ResNet50 (224²)", "read from its graph")
def _keras_resnet50():
    import keras

    return _random(keras.applications.ResNet50(weights=None))


@family("keras.applications.ResNet50V2 (224², pre-activation)", "read from its graph")
def _keras_resnet50_v2():
    import keras

    return _random(keras.applications.ResNet50V2(weights=None))


@family("KerasHub ResNet-50 v2 classifier (224², pre-activation)", "read from its graph")
def _keras_hub_resnet50_v2():
    import keras_hub

    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 128, 256, 512],
        stackwise_num_blocks=[3, 4, 6, 3],
        stackwise_num_strides=[1, 2, 2, 2],
        block_type="bottleneck_block",
        use_pre_activation=True,
        image_shape=(224, 224, 3),
    )
    return _random(keras_hub.models.ResNetImageClassifier(backbone=backbone, num_classes=1000))


@family("keras.applications.MobileNetV2 (224², ReLU6)", "read from its graph")
def _keras_mobilenet_v2():
    import keras

    return _random(keras.applications.MobileNetV2(weights=None))


def measure(name: str) -> dict:
    """Build one family, convert it (verified), and measure the error on fresh batches."""
    from keras_dmr.convert import compare, to_plain

    build, note = FAMILIES[name]
    model = build()
    plain = to_plain(model)
    shape = tuple(model.inputs[0].shape[1:])
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(4, *shape)).astype("float32") for _ in range(3)]
    report = plain.conversion_report
    return {
        "family": name,
        "note": note,
        "params_before": report["params_before"],
        "params_after": report["params_after"],
        "flops_before": report["flops_before"],
        "flops_after": report["flops_after"],
        "max_relative_error": compare(model, plain, inputs=batches),
        "plain_convolutions": sum(
            1 for lyr in plain.layers if type(lyr).__name__.endswith("Conv2D")
        ),
    }


def render(rows: list[dict]) -> str:
    lines = [
        "| family | params | plain params | MACs | plain MACs | MACs ratio | max rel. error "
        "| plain convs | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['params_before'] / 1e6:.3f}M | {r['params_after'] / 1e6:.3f}M "
            f"| {r['flops_before'] / 1e6:.1f}M | {r['flops_after'] / 1e6:.1f}M "
            f"| {r['flops_after'] / r['flops_before']:.2f}× | {r['max_relative_error']:.1e} "
            f"| {r['plain_convolutions']} | {r['note']} |"
        )
    return "\n".join(lines)


def regenerate(json_path="docs/data/conversion.json", doc="docs/conversion.md", measure_again=True):
    from keras_dmr.utils.markdown import replace_section
    from keras_dmr.utils.timing import machine_description

    json_path, doc = Path(json_path), Path(doc)
    if measure_again:
        rows = []
        for name in FAMILIES:
            print(f"converting {name} ...", file=sys.stderr, flush=True)
            rows.append(measure(name))
        payload = {"machine": machine_description(), "rows": rows}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=1) + "\n")
    rows = json.loads(json_path.read_text())["rows"]
    doc.write_text(replace_section(doc.read_text(), "conversion-table", render(rows)))


if __name__ == "__main__":
    regenerate(measure_again="--render-only" not in sys.argv)
