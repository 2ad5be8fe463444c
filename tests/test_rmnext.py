"""RMNeXt (RMNet D×E_C, RMNet paper Sec. 5.4): Table 4's plain network, Table 3's counts, RM."""

import keras
import numpy as np
import pytest
from conftest import max_rel_error, randomize

from keras_dmr.analysis.flops import count_flops
from keras_dmr.convert import to_plain
from keras_dmr.models.rmnext import RMNeXt

# Table 4, RMNet 26×3_32 as printed by PyTorch: every Conv2d as
# (kernel, stride, groups, in_channels, out_channels); a ReLU follows each one, then
# AdaptiveAvgPool2d, Flatten and Linear(512 → 10).
TABLE4 = [
    (3, 1, 1, 3, 64),  # (0)
    (1, 1, 1, 64, 192),  # (2)
    (3, 1, 6, 192, 192),  # (4)
    (1, 1, 1, 192, 64),  # (6)
    (1, 1, 1, 64, 192),  # (8)
    (3, 1, 6, 192, 192),  # (10)
    (1, 1, 1, 192, 64),  # (12)
    (1, 1, 1, 64, 320),  # (14)
    (3, 2, 5, 320, 320),  # (16)
    (1, 1, 1, 320, 128),  # (18)
    (1, 1, 1, 128, 384),  # (20)
    (3, 1, 6, 384, 384),  # (22)
    (1, 1, 1, 384, 128),  # (24)
    (1, 1, 1, 128, 640),  # (26)
    (3, 2, 5, 640, 640),  # (28)
    (1, 1, 1, 640, 256),  # (30)
    (1, 1, 1, 256, 768),  # (32)
    (3, 1, 6, 768, 768),  # (34)
    (1, 1, 1, 768, 256),  # (36)
    (1, 1, 1, 256, 1280),  # (38)
    (3, 2, 5, 1280, 1280),  # (40)
    (1, 1, 1, 1280, 512),  # (42)
    (1, 1, 1, 512, 1536),  # (44)
    (3, 1, 6, 1536, 1536),  # (46)
    (1, 1, 1, 1536, 512),  # (48)
]
TABLE4_CLASSES = 10
# Table 3's caption.
BLOCKS = {26: (2, 2, 2, 2), 41: (2, 3, 5, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
BLOCKS[152] = (3, 8, 36, 3)


def table4_counts(size: int = 32) -> tuple[int, int]:
    """Parameters (convolutions with bias, as the plain model has them, and the classifier) and
    multiply-accumulates of Table 4's network on a ``size``×``size`` image."""
    params = flops = 0
    for k, s, g, c_in, c_out in TABLE4:
        size //= s
        params += k * k * c_in // g * c_out + c_out
        flops += size * size * k * k * c_in // g * c_out
    return params + 512 * TABLE4_CLASSES + TABLE4_CLASSES, flops + 512 * TABLE4_CLASSES


def hand_counts(depth, expansion, cpg, *, variant, classes, size, plain=False):
    """Parameters (Keras' count: BN has 4 per channel; plain convolutions have a bias) and
    multiply-accumulates of RMNet D×E_C, from the paper's description: middle width
    (E−1)·C_s, C·2^s channels per group, a projection where a stage starts; the plain form
    reserves the block input, so its middle width is (E−1)·C_s + C_in."""
    params = flops = 0
    c_in, stems = 3, [1] if variant == "cifar" else [2, 2]
    for s in stems:
        size //= s
        params += 9 * c_in * 64 + (64 if plain else 4 * 64)
        flops += size * size * 9 * c_in * 64
        c_in = 64
    for stage, (n, c_out) in enumerate(zip(BLOCKS[depth], (64, 128, 256, 512), strict=True)):
        group = cpg * 2**stage
        for b in range(n):
            stride = 2 if b == 0 and stage > 0 else 1
            out = size // stride
            mid = (expansion - 1) * c_out + (c_in if plain else 0)
            convs = [(size, c_in * mid), (out, 9 * group * mid), (out, mid * c_out)]
            if not plain and (stride > 1 or c_in != c_out):
                convs.append((out, c_in * c_out))
            for hw, weights in convs:
                params += weights
                flops += hw * hw * weights
            widths = [mid, mid, c_out] + ([c_out] if len(convs) == 4 else [])
            params += sum(widths) if plain else 4 * sum(widths)
            size, c_in = out, c_out
    return params + 512 * classes + classes, flops + 512 * classes


@pytest.fixture(scope="module")
def rmnet26():
    model = randomize(RMNeXt(26, expansion=3, channels_per_group=32, compile=False), seed=3)
    return model, to_plain(model, verify=True)


def test_rmnet26x3_32_counts(rmnet26):
    model, plain = rmnet26
    train_params, train_flops = hand_counts(26, 3, 32, variant="cifar", classes=10, size=32)
    assert model.count_params() == train_params  # 8,929,226
    assert abs(train_params / 1e6 - 8.8) / 8.8 <= 0.05  # Table 3: 8.8M
    assert count_flops(model) == train_flops  # 469.4M multiply-accumulates
    plain_params, plain_flops = table4_counts()
    assert plain.count_params() == plain_params  # 12,049,418
    assert abs(plain_params / 1e6 - 12.0) / 12.0 <= 0.01
    assert count_flops(plain) == plain_flops  # 646.6M
    # The hand formula's plain form is Table 4 to the parameter.
    plain_hand = hand_counts(26, 3, 32, variant="cifar", classes=10, size=32, plain=True)
    assert plain_hand == (plain_params, plain_flops)
    report = plain.conversion_report
    assert report["params_before"] == train_params and report["flops_after"] == plain_flops
    assert report["max_relative_error"] <= 1e-4


def test_rmnet26x3_32_plain_is_table4(rmnet26):
    _, plain = rmnet26
    convs, kinds = [], []
    for layer in plain.layers[1:]:
        if isinstance(layer, keras.layers.Conv2D):
            kinds.append("conv")
            k, s = layer.kernel_size, layer.strides
            assert k[0] == k[1] and s[0] == s[1]
            convs.append((k[0], s[0], layer.groups, layer.input.shape[-1], layer.filters))
        elif isinstance(layer, keras.layers.ReLU):
            assert layer.max_value is None and float(layer.negative_slope) == 0
            kinds.append("relu")
        elif isinstance(layer, keras.layers.GlobalAveragePooling2D):
            kinds.append("gap")
        elif isinstance(layer, keras.layers.Dense):
            assert layer.kernel.shape == (512, TABLE4_CLASSES)
            kinds.append("dense")
        else:
            kinds.append(type(layer).__name__)
    assert convs == TABLE4
    assert kinds == ["conv", "relu"] * len(TABLE4) + ["gap", "dense"]


def test_training_form_blocks(rmnet26):
    model, _ = rmnet26
    blocks = model.blocks
    assert [b.name for b in blocks[:3]] == ["stage1_block1", "stage1_block2", "stage2_block1"]
    # (E−1)·C_s middle channels in groups of 32·2^s: 4 groups in every stage
    assert [(b.filters, b.bottleneck_width, b.groups, b.strides) for b in blocks[::2]] == [
        (64, 128, 4, 1),
        (128, 256, 4, 2),
        (256, 512, 4, 2),
        (512, 1024, 4, 2),
    ]
    assert [bool(b.projection) for b in blocks] == [False, False] + [True, False] * 3


SMALL = dict(
    depth=None,
    blocks_per_stage=(2, 1, 1, 1),
    widths=(8, 16, 32, 64),
    expansion=3,
    channels_per_group=4,
    classes=5,
    compile=False,
)


@pytest.mark.parametrize("fuse_bn", [True, False], ids=["fused", "bn_kept"])
@pytest.mark.parametrize(
    "variant,shape,implementation",
    [
        ("cifar", (32, 32, 3), "split"),
        ("cifar", (20, 28, 3), "grouped"),
        ("imagenet", (40, 40, 3), "split"),
    ],
)
def test_to_plain_is_equivalent(variant, shape, implementation, fuse_bn, rng):
    model = RMNeXt(variant=variant, input_shape=shape, implementation=implementation, **SMALL)
    randomize(model, seed=5)
    plain = to_plain(model, fuse_bn=fuse_bn, verify=False)
    errors = []
    for _ in range(4):
        x = rng.normal(size=(3, *shape)).astype("float32")
        errors.append(max_rel_error(plain(x, training=False), model(x, training=False)))
    # float32 against float32: typically 0.5–2.5e-7 here; 1e-4 is the package's worst-case bound.
    assert max(errors) <= 1e-4, errors
    allowed = (keras.layers.InputLayer, keras.layers.Conv2D, keras.layers.ReLU)
    allowed += (keras.layers.BatchNormalization,) if not fuse_bn else ()
    allowed += (keras.layers.GlobalAveragePooling2D, keras.layers.Dense)
    assert all(isinstance(layer, allowed) for layer in plain.layers)
    # Reserved channels group like the block's own: (mid + c_in) / (C·2^s) groups.
    grouped = [layer.groups for layer in plain.layers if getattr(layer, "groups", 1) > 1]
    assert grouped == [(16 + 8) // 4, (16 + 8) // 4, (32 + 8) // 8, (64 + 16) // 16, 160 // 32]


def test_imagenet_41x4_8_parameters():
    model = RMNeXt(41, expansion=4, channels_per_group=8, variant="imagenet", compile=False)
    params, flops = hand_counts(41, 4, 8, variant="imagenet", classes=1000, size=224)
    assert model.count_params() == params  # 11,287,208
    # Table 3 prints 11.2M (and 1.9 GFLOPs): our training form, 11.29M and 1.84G.
    assert abs(params / 1e6 - 11.2) / 11.2 <= 0.05
    assert count_flops(model) == flops
    assert [layer.strides for layer in model.layers[1:7:3]] == [(2, 2), (2, 2)]
    assert model.get_layer("stage4_block3").output.shape == (None, 7, 7, 512)
    assert [b.groups for b in model.blocks[::4]] == [24, 24, 24, 24]


# Table 3's ImageNet rows whose Params(M) and FLOPs(G) are the plain (deployed) form.
PLAIN_ROWS = [(41, 5, 16, 23.9, 3.79), (50, 5, 32, 39.6, 6.88), (50, 6, 32, 47.6, 8.26)]
PLAIN_ROWS += [(101, 6, 16, 59.45, 11.11), (152, 6, 32, 126.92, 25.32)]


@pytest.mark.parametrize("row", PLAIN_ROWS, ids=lambda r: f"{r[0]}x{r[1]}_{r[2]}")
def test_imagenet_rows_hand_count_match_table3_plain(row):
    depth, expansion, cpg, paper_params, paper_flops = row
    params, flops = hand_counts(
        depth, expansion, cpg, variant="imagenet", classes=1000, size=224, plain=True
    )
    assert abs(params / 1e6 - paper_params) / paper_params <= 0.005
    assert abs(flops / 1e9 - paper_flops) / paper_flops <= 0.005


@pytest.mark.slow
@pytest.mark.parametrize("row", PLAIN_ROWS[:2], ids=lambda r: f"{r[0]}x{r[1]}_{r[2]}")
def test_imagenet_rows_built_and_converted(row):
    depth, expansion, cpg, _, _ = row
    model = RMNeXt(
        depth, expansion=expansion, channels_per_group=cpg, variant="imagenet", compile=False
    )
    randomize(model, seed=1)
    plain = to_plain(model, verify=True)
    train = hand_counts(depth, expansion, cpg, variant="imagenet", classes=1000, size=224)
    hand = hand_counts(
        depth, expansion, cpg, variant="imagenet", classes=1000, size=224, plain=True
    )
    assert (model.count_params(), count_flops(model)) == train
    assert (plain.count_params(), count_flops(plain)) == hand


def test_save_load_and_config(tmp_path, rng):
    model = RMNeXt(input_shape=(16, 16, 3), **{**SMALL, "compile": True})
    randomize(model, seed=2)
    config = model.get_config()
    assert config["depth"] == 17 and config["blocks_per_stage"] == [2, 1, 1, 1]
    assert RMNeXt.from_config(config).get_config() == config
    path = tmp_path / "rmnext.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is RMNeXt and loaded.get_config() == config
    for _ in range(2):
        x = rng.normal(size=(2, 16, 16, 3)).astype("float32")
        np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    paper = RMNeXt(26, compile=False, name="r").get_config()
    assert paper["blocks_per_stage"] is None and paper["widths"] == [64, 128, 256, 512]
    headless = RMNeXt(include_top=False, pooling="avg", input_shape=(16, 16, 3), **SMALL)
    assert headless.output.shape == (None, 64)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(depth=34), r"`depth` must be one of \(26, 41, 50, 101, 152\)"),
        (dict(depth=[26]), "`depth` must be one of"),
        (dict(expansion=1), "`expansion` must be an integer >= 2"),
        (dict(expansion=2.5), "`expansion`"),
        (dict(channels_per_group=64), r"valid values are \[1, 2, 4, 8, 16, 32\]"),
        (dict(channels_per_group=0), "`channels_per_group`"),
        (dict(channels_per_group=12), "`channels_per_group`"),
        (dict(variant="mnist"), "`variant` must be one of"),
        (dict(blocks_per_stage=(1, 1, 1)), "`blocks_per_stage` must be 4 integers"),
        (dict(blocks_per_stage=(1, 1, 1, 1)), r"`depth` must be None or 14"),
        (dict(widths=(64, 128, 256)), "`widths` must be 4 integers"),
        (dict(input_shape=(6, 6, 3)), "downsamples 3 times: height and width must be >= 8"),
        (dict(input_shape=(2, 2, 3)), "must be >= 8"),
        (dict(input_shape=(32, 32)), "`input_shape` must be"),
        (dict(variant="imagenet", input_shape=(16, 16, 3)), "must be >= 32"),
        (dict(pooling="sum"), "`pooling`"),
        (dict(classes=0), "`classes`"),
        (dict(implementation="fast"), "`implementation`"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RMNeXt(**{"compile": False, **kwargs})
