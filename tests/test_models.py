"""Shapes and parameter layout of the Hybrid-ViT, the UNet decoder and TransUNet."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddep_jax.models import hybrid_vit, unet_decoder
from ddep_jax.models.transunet import TransUNet, build_model
from ddep_jax.training.optim import path_str

TINY_ENCODER = dict(vit_size="mu", resnet_layers=(1, 2, 1), resnet_width=8,
                    image_size=(32, 48), num_groups=4)


def test_encoder_feature_shapes():
    enc = hybrid_vit.HybridViT(**TINY_ENCODER)
    x = jnp.zeros((2, 32, 48, 3))
    feats = jax.eval_shape(lambda: enc.apply(enc.init(jax.random.key(0), x), x))
    assert feats.tokens.shape == (2, 2, 3, 32)  # 1/16, hidden 32
    assert [s.shape for s in feats.skips] == [(2, 16, 24, 8), (2, 8, 12, 32),
                                             (2, 4, 6, 64)]  # 1/2, 1/4, 1/8


def test_paper_encoder_layout_matches_r50_vit_b16():
    """R50+ViT-B/16 at 224: skips 64/256/512 ch at 1/2, 1/4, 1/8, tokens 768 at 1/16,
    and the upstream parameter names and shapes."""
    enc = hybrid_vit.HybridViT(vit_size="B")
    x = jnp.zeros((1, 224, 224, 3))
    variables = jax.eval_shape(enc.init, jax.random.key(0), x)
    feats = jax.eval_shape(enc.apply, variables, x)
    assert feats.tokens.shape == (1, 14, 14, 768)
    assert [s.shape[-1] for s in feats.skips] == [64, 256, 512]
    shapes = {path_str(p): a.shape for p, a in
              jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
    assert shapes["conv_root/kernel"] == (7, 7, 3, 64)
    assert shapes["block3/unit9/conv3/kernel"] == (1, 1, 256, 1024)
    assert shapes["block2/unit1/conv_proj/kernel"] == (1, 1, 256, 512)
    assert shapes["embedding/kernel"] == (1, 1, 1024, 768)
    assert shapes["Transformer/posembed_input/pos_embedding"] == (1, 196, 768)
    attn = "Transformer/encoderblock_11/MultiHeadDotProductAttention_0"
    assert shapes[f"{attn}/query/kernel"] == (768, 12, 64)
    assert shapes[f"{attn}/out/kernel"] == (12, 64, 768)
    assert shapes["Transformer/encoderblock_11/MlpBlock_0/Dense_0/kernel"] == (768, 3072)
    assert not any(k.startswith("block4") for k in shapes)
    n_params = sum(np.prod(s) for s in shapes.values())
    assert 97e6 < n_params < 99e6  # public R50+ViT-B/16 without its head: ~98M


@pytest.mark.parametrize("multiplier,first,last", [(1, 1024, 64), (2, 2048, 128),
                                                    (3, 3072, 192)])
def test_decoder_widths_follow_multiplier(multiplier, first, last):
    model = TransUNet(TINY_ENCODER, decoder_multiplier=multiplier)
    x = jnp.zeros((1, 32, 48, 3))
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert set(params) == {"encoder", "decoder", "head"}
    assert params["decoder"]["block0"]["conv2"]["conv"]["kernel"].shape[-1] == first
    assert params["decoder"]["block4"]["conv2"]["conv"]["kernel"].shape[-1] == last


@pytest.mark.parametrize("conditioning", [False, True])
def test_transunet_output_shape_and_dtype(conditioning):
    model = TransUNet(TINY_ENCODER, decoder_widths=(16, 16, 8, 8, 8),
                      decoder_num_groups=4, num_outputs=5,
                      noise_conditioning=conditioning)
    x = jax.random.normal(jax.random.key(1), (2, 32, 48, 3))
    sigma = jnp.array([0.1, 0.5]) if conditioning else None
    variables = model.init(jax.random.key(0), x, sigma)
    out = model.apply(variables, x, sigma)
    chex.assert_shape(out, (2, 32, 48, 5))
    chex.assert_type(out, jnp.float32)
    chex.assert_tree_all_finite(out)
    # encode/decode split equals the full call.
    feats = model.apply(variables, x, method=model.encode)
    chex.assert_trees_all_close(model.apply(variables, feats, sigma,
                                            method=model.decode), out)


def test_noise_conditioning_starts_as_identity_and_uses_sigma():
    model = TransUNet(TINY_ENCODER, decoder_widths=(16, 16, 8, 8, 8),
                      decoder_num_groups=4, noise_conditioning=True)
    x = jax.random.normal(jax.random.key(1), (2, 32, 48, 3))
    variables = model.init(jax.random.key(0), x, jnp.ones(2))
    a = model.apply(variables, x, jnp.array([0.1, 0.1]))
    b = model.apply(variables, x, jnp.array([0.9, 0.9]))
    chex.assert_trees_all_close(a, b)  # FiLM initialised to zero
    bumped = jax.tree.map(lambda v: v + 0.1, variables)
    a = model.apply(bumped, x, jnp.array([0.1, 0.1]))
    b = model.apply(bumped, x, jnp.array([0.9, 0.9]))
    assert not np.allclose(a, b)
    # Without a level (fine-tuning, inference) the decoder sees sigma = 0,
    # embedded as the floor: finite, as at the lowest level it was trained on.
    clean = model.apply(bumped, x, None)
    chex.assert_tree_all_finite(clean)
    chex.assert_trees_all_close(clean, model.apply(bumped, x, jnp.zeros(2)))
    chex.assert_trees_all_close(
        clean, model.apply(bumped, x, jnp.full((2,), unet_decoder.SIGMA_FLOOR)))


def test_noise_level_embedding_is_finite_from_sigma_zero():
    sigma = jnp.array([0.0, 1e-6, unet_decoder.SIGMA_FLOOR, 0.22, 0.5])
    emb = unet_decoder.noise_level_embedding(sigma, 16)
    chex.assert_shape(emb, (5, 16))
    chex.assert_tree_all_finite(emb)
    # Below the floor all levels embed alike; above it they differ.
    np.testing.assert_array_equal(emb[0], emb[2])
    np.testing.assert_array_equal(emb[1], emb[2])
    assert not np.allclose(emb[3], emb[4])


def test_other_input_size_resamples_position_embedding():
    model = TransUNet(TINY_ENCODER, decoder_widths=(16, 16, 8, 8, 8),
                      decoder_num_groups=4)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 48, 3)))
    out = model.apply(variables, jnp.zeros((1, 64, 64, 3)))
    assert out.shape == (1, 64, 64, 3)


def test_pos_embedding_resize_identity_and_shape():
    pos = jax.random.normal(jax.random.key(0), (1, 6, 4))
    assert hybrid_vit.resize_pos_embedding(pos, (2, 3), (2, 3)) is pos
    assert hybrid_vit.resize_pos_embedding(pos, (2, 3), (4, 5)).shape == (1, 20, 4)


def test_weight_standardize_formula():
    w = np.random.RandomState(0).randn(3, 3, 4, 5).astype(np.float32) * 3 + 1
    got = np.asarray(hybrid_vit.weight_standardize(jnp.asarray(w)))
    mean = w.reshape(-1, 5).mean(0)
    std = w.reshape(-1, 5).std(0)
    np.testing.assert_allclose(got, (w - mean) / (std + 1e-5), rtol=1e-5, atol=1e-5)


def test_upsample2x_equals_jax_image_resize():
    from ddep_jax.models.unet_decoder import upsample2x_bilinear

    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 3))
    np.testing.assert_allclose(upsample2x_bilinear(x),
                               jax.image.resize(x, (2, 10, 14, 3), "bilinear"),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,kernel,strides", [
    ((2, 9, 7, 16), (3, 3, 16, 17), (1, 1)),   # fast path, per-tap kernel gradient
    ((2, 6, 9, 18), (3, 5, 18, 16), (1, 1)),   # fast path, 3x5 kernel
    ((2, 8, 6, 16), (1, 1, 16, 16), (1, 1)),   # fast path, 1x1
    ((2, 9, 7, 5), (3, 3, 5, 4), (1, 1)),   # fast path, XLA's kernel gradient (< 16 ch)
    ((2, 9, 7, 5), (3, 3, 5, 4), (2, 2)),   # falls back to lax
])
def test_fast_conv_matches_lax_values_and_gradients(shape, kernel, strides):
    from jax import lax

    from ddep_jax.models.fast_conv import conv_general_dilated

    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), kernel)
    pad = [(kernel[0] // 2,) * 2, (kernel[1] // 2,) * 2]
    dn = lax.conv_dimension_numbers(shape, kernel, ("NHWC", "HWIO", "NHWC"))

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, strides, pad,
                                                 dimension_numbers=dn)))

    np.testing.assert_allclose(
        conv_general_dilated(x, w, strides, pad, dimension_numbers=dn),
        lax.conv_general_dilated(x, w, strides, pad, dimension_numbers=dn),
        rtol=1e-5, atol=1e-5)
    got = jax.grad(loss(conv_general_dilated), (0, 1))(x, w)
    want = jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size,kernel,stride,cin,cout,padding", [
    (8, 3, 2, 32, 48, "SAME"),     # the ResNet's block3 unit1 conv2 shape family
    (9, 3, 2, 16, 16, "SAME"),     # odd input side
    (16, 7, 2, 16, 32, "SAME"),    # a 7x7/2 root-like kernel
    (8, 1, 2, 32, 64, "SAME"),     # the 1x1/2 projection
    (12, 3, 3, 16, 16, [(1, 1), (1, 1)]),  # stride 3, explicit pads
    (10, 3, 2, 16, 24, "VALID"),
])
def test_strided_conv_input_gradient_matches_lax_exactly(size, kernel, stride, cin,
                                                         cout, padding):
    """'auto' on CPU: strided convolutions' input gradient per kernel tap
    (`fast_conv.conv_strided`) equals XLA's in float64 to rounding; values
    and the kernel gradient are XLA's own. 'auto' takes it only for outputs
    of at most 4x4 positions."""
    from jax import lax

    from ddep_jax.models import fast_conv

    def conv_strided(x, w, strides, padding, dimension_numbers):
        del dimension_numbers  # NHWC / HWIO
        pads = fast_conv.explicit_pads(x.shape[1:3], w.shape[:2], strides, padding)
        return fast_conv.conv_strided(x, w, strides, tuple(pads))

    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, size, size + 1, cin)))
        w = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)))

        def loss(conv):
            return lambda x, w: jnp.sum(jnp.sin(conv(
                x, w, (stride, stride), padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"))))

        assert loss(conv_strided)(x, w) == loss(lax.conv_general_dilated)(x, w)
        (dx, dw), (want_dx, want_dw) = (jax.grad(loss(c), (0, 1))(x, w) for c in (
            conv_strided, lax.conv_general_dilated))
        np.testing.assert_allclose(dx, want_dx, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(dw, want_dw)

        def routed(hw, channels):  # does 'auto' take the per-tap gradient?
            xs = jnp.zeros((1, *hw, channels))
            ws = jnp.zeros((kernel, kernel, channels, channels))
            jaxpr = str(jax.make_jaxpr(lambda x: fast_conv.conv_general_dilated_auto(
                x, ws, (stride, stride), padding, dimension_numbers=(
                    "NHWC", "HWIO", "NHWC")))(xs))
            return "custom_vjp_call" in jaxpr

        assert routed((8, 8), 64)  # 4x4 or fewer outputs, 64 channels or more
        assert not routed((24, 24), 64) and not routed((8, 8), 32)


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 16, 16, 8), (3, 3), (2, 2), "SAME"),    # the ResNet root's pool
    ((2, 15, 13, 4), (3, 3), (2, 2), "SAME"),    # odd sides
    ((1, 9, 9, 3), (2, 2), (2, 2), "VALID"),     # windows that do not overlap
    ((2, 10, 10, 5), (3, 2), (1, 2), ((1, 0), (2, 1))),  # explicit pads
])
def test_max_pool_taps_matches_flax_values_and_gradients(shape, window, strides,
                                                         padding):
    """'auto' on CPU: the max pool's gradient per window tap
    (`fast_conv.max_pool_taps`) routes dy to the same input as XLA's
    select-and-scatter, the first maximum of a window in row-major order,
    also where a window's values tie (after a ReLU, whole windows are 0):
    with integer dy the gradients are equal exactly (a routing difference
    would be a whole dy); values are equal exactly."""
    import flax.linen as nn

    from ddep_jax.models import fast_conv

    x = jax.random.normal(jax.random.key(0), shape)
    tied = jnp.maximum(jnp.round(x), 0.0)  # many equal values per window
    for inputs in (x, tied):
        flax_pool = lambda v: nn.max_pool(v, window, strides, padding)
        taps_pool = lambda v: fast_conv.max_pool_auto(v, window, strides, padding)
        want, got = flax_pool(inputs), taps_pool(inputs)
        np.testing.assert_array_equal(got, want)
        dy = jnp.round(4 * jax.random.normal(jax.random.key(1), want.shape))
        np.testing.assert_array_equal(jax.vjp(taps_pool, inputs)[1](dy)[0],
                                      jax.vjp(flax_pool, inputs)[1](dy)[0])
        dy = jax.random.normal(jax.random.key(2), want.shape)
        np.testing.assert_allclose(jax.vjp(taps_pool, inputs)[1](dy)[0],
                                   jax.vjp(flax_pool, inputs)[1](dy)[0],
                                   rtol=0, atol=1e-6)  # summation order only
    # bfloat16 (integer-valued, so exact): the same values and routing.
    low = jnp.round(4 * x).astype(jnp.bfloat16)
    flax_pool = lambda v: nn.max_pool(v, window, strides, padding)
    taps_pool = lambda v: fast_conv.max_pool_auto(v, window, strides, padding)
    dy = jnp.ones(flax_pool(low).shape, jnp.bfloat16)
    got = jax.vjp(taps_pool, low)[1](dy)[0]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(
        jax.vjp(flax_pool, low)[1](dy)[0], np.float32))
    assert fast_conv.max_pool_of(fast_conv.resolve("auto")) is fast_conv.max_pool_auto
    assert fast_conv.max_pool_of(fast_conv.resolve("tap_gemm")) is fast_conv.max_pool_auto
    assert fast_conv.max_pool_of(fast_conv.resolve("xla")) is nn.max_pool


def test_per_tap_kernel_gradient_matches_lax_with_few_channels():
    """`fast_conv.kernel_gradient` itself (used from 16 channels) is exact
    for any channel count, batch and odd kernel."""
    from jax import lax

    from ddep_jax.models.fast_conv import kernel_gradient

    x = jax.random.normal(jax.random.key(0), (3, 7, 5, 2))
    dy = jax.random.normal(jax.random.key(1), (3, 7, 5, 3))
    for kh, kw in ((3, 3), (5, 3), (1, 1)):
        w = jnp.zeros((kh, kw, 2, 3))
        conv = lambda k: lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
        want = jax.vjp(conv, w)[1](dy)[0]
        np.testing.assert_allclose(kernel_gradient(x, dy, kh, kw), want,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl,fast,ynn", [("auto", True, True), ("tap_gemm", True, True),
                                           ("xla", False, False)])
def test_conv_setting_is_resolved_where_the_model_is_built(impl, fast, ynn):
    """`model.conv`: 'auto' is, on this (CPU) backend, XLA's convolutions
    with the strided ones' input gradient per tap, compiled with YNNPACK
    dots; 'tap_gemm' also the stride-1 kernel gradient per tap; 'xla' plain
    convolutions and default options; the model's program says which it got."""
    from conftest import tiny_config

    from ddep_jax.models import fast_conv

    assert jax.default_backend() == "cpu"
    assert fast_conv.resolve(impl) is {
        "auto": fast_conv.conv_general_dilated_auto,
        "tap_gemm": fast_conv.conv_general_dilated,
        "xla": jax.lax.conv_general_dilated}[impl]
    config = tiny_config(**{"model.conv": impl})
    model = build_model(config.model)
    x = jnp.zeros((1, 32, 32, 3))
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply(p, x))(params))
    assert ("custom_vjp_call" in jaxpr) == fast
    assert (fast_conv.compiler_options(impl) == fast_conv.YNN_DOT_OPTIONS) == ynn
    assert fast_conv.compiler_options(impl, "xla") is None  # model.cpu_dot_fusion
    for bad in (fast_conv.resolve, fast_conv.compiler_options):
        with pytest.raises(ValueError, match="model.conv='cudnn'"):
            bad("cudnn")
    with pytest.raises(ValueError, match="model.cpu_dot_fusion='mkl'"):
        fast_conv.compiler_options(impl, "mkl")


def test_build_model_from_config():
    from conftest import tiny_config

    model = build_model(tiny_config().model)
    out = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert set(out["params"]) == {"encoder", "decoder", "head"}


def test_cpu_fast_path_is_as_accurate_as_plain_convolutions():
    """Loss and gradients of every parameter of a TransUNet (encoder
    included) in float32 with model.conv 'auto' (XLA compiled with YNNPACK
    dots on CPU), against the same model computed in float64: as close to it
    as plain float32 convolutions ('xla') are (within 3x of their measured
    error; the bounds below). (The two float32 paths differ from each other
    by up to ~0.4% in some leaves of this small random network, as XLA's and
    YNNPACK's summation orders differ; float64 says both are ~1e-6
    accurate.) 'tap_gemm' is checked against lax above."""
    from conftest import tiny_config

    from ddep_jax.models import fast_conv

    config = tiny_config(**{"model.decoder_widths": (32, 16, 16, 16, 16)})
    rng = np.random.RandomState(0)
    images = rng.uniform(-1, 1, (2, 32, 32, 3))
    targets = rng.randn(2, 32, 32, 3)

    def grads(impl, dtype):
        with config.unlocked():
            config.model.update(conv=impl, dtype=dtype)
        model = build_model(config.model)
        # Jitted: one compile of the init, not one per op (the test alone: 68 s
        # -> 32 s).
        params = jax.jit(model.init)(jax.random.key(0),
                                     jnp.zeros((1, 32, 32, 3), dtype))["params"]
        params = jax.tree.map(lambda p: p.astype(dtype), params)
        loss = lambda p: jnp.mean((model.apply({"params": p}, images.astype(dtype),
                                               train=False) - targets.astype(dtype)) ** 2)
        return jax.device_get(jax.jit(jax.value_and_grad(loss),
                                      compiler_options=fast_conv.compiler_options(impl))(params))

    def errors(result, truth):
        (loss, g), (true_loss, true_g) = result, truth
        leaves = [(jax.tree_util.keystr(k), a, b) for (k, a), b in zip(
            jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(true_g))]
        # Attention key biases have zero gradient in exact arithmetic (softmax
        # is shift-invariant): their float32 values are rounding noise. The
        # residual branches before a zero-initialised last GroupNorm scale
        # have exactly zero gradient: float32 must give exactly zero too.
        relative = []
        for k, a, b in leaves:
            if "key" in k and "bias" in k:
                continue
            if not np.any(b):
                assert not np.any(a), (k, "nonzero gradient where it is exactly 0")
                continue
            relative.append(np.linalg.norm(a - b) / np.linalg.norm(b))
        assert len(relative) > len(leaves) // 2
        return abs(loss - true_loss) / abs(true_loss), max(relative)

    with jax.enable_x64(True):
        truth = grads("xla", "float64")
        got = errors(grads("auto", "float32"), truth)
    # Plain float32 convolutions ('xla') measured 1.3e-8 (loss) and 5.0e-6
    # (worst gradient leaf) against float64 on this network, the fast path
    # 1.3e-8 and 5.3e-6: it must stay within 3x of plain's (a wrong tap or
    # layout gives ~1e-1).
    for what, e, bound in zip(("loss", "gradient"), got, (1e-6, 1.5e-5)):
        assert e <= bound, (what, e, bound)


def test_conditioned_decoder_gets_its_clean_level_on_clean_images():
    """Fine-tuning a conditioned decoder on clean images feeds it
    `clean_noise_level` (a level inside its pretraining range), not sigma 0."""
    model = TransUNet(TINY_ENCODER, decoder_widths=(16, 16, 8, 8, 8),
                      decoder_num_groups=4, noise_conditioning=True,
                      clean_noise_level=0.23)
    x = jax.random.normal(jax.random.key(1), (2, 32, 48, 3))
    variables = jax.tree.map(lambda v: v + 0.1,
                             model.init(jax.random.key(0), x, jnp.ones(2)))
    clean = model.apply(variables, x, None)
    chex.assert_trees_all_close(clean, model.apply(variables, x, jnp.full((2,), 0.23)))
    assert not np.allclose(clean, model.apply(variables, x, jnp.zeros(2)))
