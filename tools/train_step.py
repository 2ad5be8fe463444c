"""Training-step time of the merge-and-run family against its Table 2 partners (A B A B …)."""

from __future__ import annotations

import json

import keras_dmr
from keras_dmr.utils.timing import inference_fn, interleaved, machine_description, train_step_fn


def train_step_benchmark(
    *, batch_size: int = 64, warmup: int = 3, iters: int = 5, repeats: int = 5
) -> dict:
    """DMRNet-50 (split and grouped), DVANet-50 and ResNet-98 at one batch size, interleaved."""
    models = {
        "DMRNet-50 split": keras_dmr.DMRNet(50, implementation="split"),
        "DMRNet-50 grouped": keras_dmr.DMRNet(50, implementation="grouped"),
        "DVANet-50 split": keras_dmr.DVANet(50, implementation="split"),
        "ResNet-98": keras_dmr.ResNet(98),
    }
    train = interleaved(
        {n: train_step_fn(m, batch_size) for n, m in models.items()},
        warmup=warmup,
        iters=iters,
        repeats=repeats,
    )
    infer = interleaved(
        {n: inference_fn(m, batch_size) for n, m in models.items()},
        warmup=warmup,
        iters=iters,
        repeats=repeats,
    )
    base_t, base_i = train["ResNet-98"]["median_s"], infer["ResNet-98"]["median_s"]
    return {
        "machine": machine_description(),
        "batch_size": batch_size,
        "repeats": repeats,
        "iters": iters,
        "results": {
            n: {
                "params": models[n].count_params(),
                "train_step_ms": 1e3 * train[n]["median_s"],
                "train_step_spread_ms": [1e3 * train[n]["min_s"], 1e3 * train[n]["max_s"]],
                "train_vs_resnet98": train[n]["median_s"] / base_t,
                "inference_ms": 1e3 * infer[n]["median_s"],
                "inference_vs_resnet98": infer[n]["median_s"] / base_i,
            }
            for n in models
        },
    }


if __name__ == "__main__":
    import sys

    out = train_step_benchmark()
    text = json.dumps(out, indent=2)
    print(text)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(text + "\n")
