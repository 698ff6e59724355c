"""Importing the public ViT `.npz` checkpoints (google-research/vision_transformer)
into our encoder: both key-naming schemes, GroupNorm reshapes, the class-token
row and the position-embedding grid, error reports, the Orbax output, and the
imported encoder's features against an independent numpy forward pass."""

import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from conftest import tiny_config

from ddep_jax.checkpoints import partial, vit_import
from ddep_jax.models import hybrid_vit
from ddep_jax.models.transunet import build_model

# tiny_config(): ViT 'mu' (D 32, 2 blocks, 2 heads, MLP 64), R(1,1,1) width 8,
# 4 GroupNorm groups, 32x32 images -> a 2x2 token grid.
D, HEADS, MLP, LAYERS, WIDTH, GROUPS = 32, 2, 64, 2, 8, 4
POS = "Transformer/posembed_input/pos_embedding"


# ----------------------------------------------------------------------------
# A synthetic checkpoint in the upstream layout.
# ----------------------------------------------------------------------------
def upstream_npz(seed=0, *, plain=False, pos_grid=2, width=WIDTH):
    """Random arrays under the keys and shapes of an upstream pre-Linen file:
    GroupNorm as [1, 1, 1, C], the class token's row in the position
    embedding, and the classifier's cls/head/pre_logits; ResNet root width
    `width`."""
    rng = np.random.RandomState(seed)
    f32 = lambda *shape, scale=0.3, mean=0.0: (  # noqa: E731
        mean + scale * rng.randn(*shape)).astype(np.float32)
    flat = {}

    def gn(name, c):
        flat[f"{name}/scale"] = f32(1, 1, 1, c, scale=0.2, mean=1.0)
        flat[f"{name}/bias"] = f32(1, 1, 1, c, scale=0.2)

    if plain:
        flat["embedding/kernel"] = f32(16, 16, 3, D, scale=0.05)
    else:
        # Raw kernels with an offset, so that standardisation matters.
        flat["conv_root/kernel"] = f32(7, 7, 3, width, mean=0.5)
        gn("gn_root", width)
        cin = width
        for s in range(3):
            f = width * 2**s
            u = f"block{s + 1}/unit1"
            flat[f"{u}/conv1/kernel"] = f32(1, 1, cin, f, mean=0.2)
            flat[f"{u}/conv2/kernel"] = f32(3, 3, f, f, mean=-0.1)
            flat[f"{u}/conv3/kernel"] = f32(1, 1, f, 4 * f, mean=0.3)
            flat[f"{u}/conv_proj/kernel"] = f32(1, 1, cin, 4 * f, mean=0.1)
            for name, c in (("gn1", f), ("gn2", f), ("gn3", 4 * f), ("gn_proj", 4 * f)):
                gn(f"{u}/{name}", c)
            cin = 4 * f
        flat["embedding/kernel"] = f32(1, 1, cin, D, scale=0.1)
    flat["embedding/bias"] = f32(D, scale=0.1)
    flat[POS] = f32(1, 1 + pos_grid**2, D, scale=0.5)
    for i in range(LAYERS):
        b = f"Transformer/encoderblock_{i}"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            flat[f"{b}/{ln}/scale"] = f32(D, scale=0.2, mean=1.0)
            flat[f"{b}/{ln}/bias"] = f32(D, scale=0.2)
        a = f"{b}/MultiHeadDotProductAttention_1"
        for n in ("query", "key", "value"):
            flat[f"{a}/{n}/kernel"] = f32(D, HEADS, D // HEADS, scale=0.3)
            flat[f"{a}/{n}/bias"] = f32(HEADS, D // HEADS, scale=0.1)
        flat[f"{a}/out/kernel"] = f32(HEADS, D // HEADS, D, scale=0.2)
        flat[f"{a}/out/bias"] = f32(D, scale=0.1)
        flat[f"{b}/MlpBlock_3/Dense_0/kernel"] = f32(D, MLP, scale=0.2)
        flat[f"{b}/MlpBlock_3/Dense_0/bias"] = f32(MLP, scale=0.1)
        flat[f"{b}/MlpBlock_3/Dense_1/kernel"] = f32(MLP, D, scale=0.2)
        flat[f"{b}/MlpBlock_3/Dense_1/bias"] = f32(D, scale=0.1)
    flat["Transformer/encoder_norm/scale"] = f32(D, scale=0.2, mean=1.0)
    flat["Transformer/encoder_norm/bias"] = f32(D, scale=0.2)
    flat["cls"] = f32(1, 1, D)
    flat["pre_logits/kernel"] = f32(D, D)
    flat["pre_logits/bias"] = f32(D)
    flat["head/kernel"] = f32(D, 5)
    flat["head/bias"] = f32(5)
    return flat


def to_linen_names(flat):
    """The same arrays under Linen names (as flax's convert_pre_linen renames
    them), GroupNorm arrays squeezed to [C]."""
    renames = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
               "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
    out = {}
    for key, value in flat.items():
        parts = key.split("/")
        if parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
            parts[2] = renames.get(parts[2], parts[2])
        if len(parts) > 1 and re.fullmatch(r"gn(\d+|_root|_proj)", parts[-2]):
            value = value.reshape(-1)
        out["/".join(parts)] = value
    return out


def encoder_config(plain=False, **encoder):
    cfg = tiny_config()
    if plain:
        cfg.model.encoder.resnet_layers = ()
    cfg.model.encoder.update(encoder)
    return cfg.model


_ABSTRACT = {}


def abstract_encoder(plain=False):
    if plain not in _ABSTRACT:
        _ABSTRACT[plain] = vit_import.abstract_encoder_params(encoder_config(plain))
    return _ABSTRACT[plain]


def encode(params, images, plain=False):
    """The TransUNet's encoder features from imported params (jitted: one
    compile is faster than the op-by-op dispatch of the eager apply)."""
    model = build_model(encoder_config(plain))
    return jax.jit(lambda p, x: model.apply({"params": {"encoder": p}}, x,
                                            method=model.encode))(params, images)


# ----------------------------------------------------------------------------
# An independent forward pass in float64 numpy, from the upstream arrays.
# ----------------------------------------------------------------------------
def _same_pads(n, k, stride):
    out = -(-n // stride)
    total = max((out - 1) * stride + k - n, 0)
    return (total // 2, total - total // 2), out


def np_conv(x, w, stride=1, padding="SAME"):
    """NHWC x HWIO convolution, TF/lax 'SAME' or 'VALID' padding."""
    kh, kw = w.shape[:2]
    if padding == "SAME":
        (ph, oh), (pw, ow) = _same_pads(x.shape[1], kh, stride), _same_pads(
            x.shape[2], kw, stride)
    else:
        ph = pw = (0, 0)
        oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    xp = np.pad(x, ((0, 0), ph, pw, (0, 0)))
    out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += xp[:, i:i + stride * oh:stride, j:j + stride * ow:stride] @ w[i, j]
    return out


def np_max_pool(x, k=3, stride=2):
    (ph, oh), (pw, ow) = _same_pads(x.shape[1], k, stride), _same_pads(
        x.shape[2], k, stride)
    xp = np.pad(x, ((0, 0), ph, pw, (0, 0)), constant_values=-np.inf)
    return np.max([xp[:, i:i + stride * oh:stride, j:j + stride * ow:stride]
                   for i in range(k) for j in range(k)], axis=0)


def np_standardize(w, eps=1e-5):
    flat = w.reshape(-1, w.shape[-1])
    return (w - flat.mean(0)) / (flat.std(0) + eps)


def np_group_norm(x, scale, bias, groups=GROUPS, eps=1e-6):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) / np.sqrt(var + eps)
    return g.reshape(x.shape) * scale.reshape(-1) + bias.reshape(-1)


def np_layer_norm(x, scale, bias, eps=1e-6):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_gelu(x):
    """The tanh approximation upstream's `nn.gelu` computes (Hendrycks &
    Gimpel 2016, Eq. in Sec. 2)."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def np_attention(x, p):
    """Multi-head self-attention, softmax(q k^T / sqrt(d_head)) v, heads concatenated."""
    n, hd = x.shape[1], D // HEADS
    q, k, v = (np.einsum("bnd,dhe->bhne", x, p[f"{name}/kernel"])
               + p[f"{name}/bias"][None, :, None, :]
               for name in ("query", "key", "value"))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    o = weights @ v  # [B, H, N, hd]
    assert o.shape[2] == n
    return np.einsum("bhne,hed->bnd", o, p["out/kernel"]) + p["out/bias"]


def np_encoder(flat, images, plain=False):
    """(tokens [B, h, w, D], skips) of the upstream R(1,1,1)+ViT or plain ViT,
    computed from the pre-Linen arrays of `flat` (float64)."""
    sub = lambda prefix: {k[len(prefix) + 1:]: v.astype(np.float64)  # noqa: E731
                          for k, v in flat.items() if k.startswith(prefix + "/")}
    x = images.astype(np.float64)
    skips = []
    if plain:
        x = np_conv(x, flat["embedding/kernel"].astype(np.float64), 16, "VALID")
    else:
        relu = lambda v: np.maximum(v, 0)  # noqa: E731
        gn = lambda v, name: np_group_norm(v, flat[f"{name}/scale"],  # noqa: E731
                                           flat[f"{name}/bias"])
        x = relu(gn(np_conv(x, np_standardize(flat["conv_root/kernel"]), 2), "gn_root"))
        skips.append(x)
        x = np_max_pool(x)
        for s in range(3):
            u, stride = f"block{s + 1}/unit1", 1 if s == 0 else 2
            w = lambda name: np_standardize(flat[f"{u}/{name}/kernel"])  # noqa: E731
            residual = gn(np_conv(x, w("conv_proj"), stride), f"{u}/gn_proj")
            y = relu(gn(np_conv(x, w("conv1")), f"{u}/gn1"))
            y = relu(gn(np_conv(y, w("conv2"), stride), f"{u}/gn2"))
            y = gn(np_conv(y, w("conv3")), f"{u}/gn3")
            x = relu(residual + y)
            if s < 2:
                skips.append(x)
        x = np_conv(x, flat["embedding/kernel"].astype(np.float64), 1, "VALID")
    x = x + flat["embedding/bias"]
    b, h, w, _ = x.shape
    x = x.reshape(b, h * w, D) + flat[POS][:, 1:]  # class-token row dropped
    for i in range(LAYERS):
        p = sub(f"Transformer/encoderblock_{i}")
        y = np_layer_norm(x, p["LayerNorm_0/scale"], p["LayerNorm_0/bias"])
        x = x + np_attention(y, sub(f"Transformer/encoderblock_{i}/"
                                    "MultiHeadDotProductAttention_1"))
        y = np_layer_norm(x, p["LayerNorm_2/scale"], p["LayerNorm_2/bias"])
        y = np_gelu(y @ p["MlpBlock_3/Dense_0/kernel"] + p["MlpBlock_3/Dense_0/bias"])
        x = x + y @ p["MlpBlock_3/Dense_1/kernel"] + p["MlpBlock_3/Dense_1/bias"]
    x = np_layer_norm(x, flat["Transformer/encoder_norm/scale"],
                      flat["Transformer/encoder_norm/bias"])
    return x.reshape(b, h, w, D), skips


# ----------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------
def test_hybrid_import_matches_independent_forward_in_both_namings():
    flat = upstream_npz()
    params, report = vit_import.npz_to_encoder_params(
        flat, abstract_encoder(), source="R-mu.npz")
    linen_params, linen_report = vit_import.npz_to_encoder_params(
        to_linen_names(flat), abstract_encoder(), source="R-mu.npz")
    chex.assert_trees_all_equal(params, linen_params)
    assert (report["naming"], linen_report["naming"]) == ("pre-linen", "linen")
    assert report["skipped"] == ["cls", "head/bias", "head/kernel",
                                 "pre_logits/bias", "pre_logits/kernel"]
    assert report["pos_embedding"] == {
        "from_grid": [2, 2], "to_grid": [2, 2], "resampled": False,
        "cls_row_dropped": True, "checkpoint_shape": [1, 5, D]}
    assert report["groupnorm_reshaped"] == 2 + 3 * 8
    assert report["architecture"] == linen_report["architecture"] == {
        "resnet_layers": [1, 1, 1], "resnet_width": 8, "patch": [1, 1],
        "hidden_size": D, "num_layers": LAYERS, "num_heads": HEADS, "mlp_dim": MLP,
        "vit_size": "mu"}
    assert report["num_arrays"] == len(flat) - 5
    assert report["num_params"] == sum(
        v.size for k, v in flat.items() if k not in report["skipped"]) - D
    json.dumps(report)
    np.testing.assert_array_equal(params["gn_root"]["scale"],
                                  flat["gn_root/scale"].reshape(-1))
    np.testing.assert_array_equal(params["conv_root"]["kernel"], flat["conv_root/kernel"])

    images = np.random.RandomState(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    feats = encode(params, jnp.asarray(images))
    tokens, skips = np_encoder(flat, images)
    assert [s.shape for s in feats.skips] == [(2, 16, 16, 8), (2, 8, 8, 32),
                                             (2, 4, 4, 64)]
    for got, want in zip(feats.skips, skips):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(feats.tokens, tokens, rtol=1e-4, atol=1e-4)


def test_weight_standardization_is_the_formula():
    w = np.random.RandomState(0).randn(3, 3, 5, 6) * 2.0 + 0.7
    want = np.empty_like(w)
    for o in range(6):  # per output channel, over (kh, kw, cin)
        c = w[..., o]
        want[..., o] = (c - c.mean()) / (c.std() + 1e-5)
    got = hybrid_vit.weight_standardize(jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def scipy_zoom(grid, new):
    """What upstream vision_transformer (`load_pretrained`) and TransUNet
    (`load_from`) do to a [gh, gw, D] position-embedding grid."""
    gh, gw, _ = grid.shape
    out = scipy.ndimage.zoom(grid, (new[0] / gh, new[1] / gw, 1), order=1)
    assert out.shape[:2] == tuple(new)
    return out


@pytest.mark.parametrize("old,new", [((14, 14), (24, 24)), ((24, 24), (14, 14)),
                                     ((2, 3), (5, 4)), ((6, 6), (2, 2)),
                                     ((3, 4), (1, 2)), ((1, 2), (3, 5))])
def test_resize_pos_embedding_is_scipy_zoom_order_1(old, new):
    """Growing, shrinking (no antialiasing), non-square, 1-token axes."""
    grid = np.random.RandomState(sum(old + new)).randn(*old, 6).astype(np.float32)
    pos = jnp.asarray(grid.reshape(1, -1, 6))
    want = scipy_zoom(grid, new).reshape(1, -1, 6)
    got = hybrid_vit.resize_pos_embedding(pos, old, new)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    jitted = jax.jit(hybrid_vit.resize_pos_embedding, static_argnums=(1, 2))
    np.testing.assert_allclose(jitted(pos, old, new), want, rtol=1e-6, atol=1e-6)
    assert hybrid_vit.resize_pos_embedding(pos.astype(jnp.bfloat16), old,
                                           new).dtype == jnp.bfloat16


def _pos_only(pos, model_tokens, cls=True):
    flat = {POS: pos.astype(np.float32)}
    if cls:
        flat["cls"] = np.zeros((1, 1, pos.shape[-1]), np.float32)
    abstract = {"Transformer": {"posembed_input": {"pos_embedding":
                jax.ShapeDtypeStruct((1, model_tokens, pos.shape[-1]), jnp.float32)}}}
    return flat, abstract


def test_pos_embedding_cls_row_and_grid_resampling():
    rng = np.random.RandomState(0)
    # Equal grid: the rows after the class token, unchanged.
    pos = rng.randn(1, 1 + 9, 4).astype(np.float32)
    pos[0, 0] = 1e6  # the class token's row must not leak into the grid
    flat, abstract = _pos_only(pos, 9)
    params, report = vit_import.npz_to_encoder_params(flat, abstract)
    out = params["Transformer"]["posembed_input"]["pos_embedding"]
    np.testing.assert_array_equal(out, pos[:, 1:])
    assert report["pos_embedding"]["cls_row_dropped"] and not report[
        "pos_embedding"]["resampled"]

    # Upsample 3x3 -> 4x6 (non-square target given explicitly): a linear ramp
    # and random values equal upstream's scipy.ndimage.zoom(order=1).
    r, c = np.meshgrid(np.arange(3.0), np.arange(3.0), indexing="ij")
    ramp = np.stack([2.0 * r + 0.5 * c, -r + 3.0 * c], -1)  # [3, 3, 2]
    pos = np.concatenate([np.full((1, 1, 2), 1e6), ramp.reshape(1, 9, 2)], 1)
    flat, abstract = _pos_only(pos, 24)
    params, report = vit_import.npz_to_encoder_params(flat, abstract,
                                                      target_grid=(4, 6))
    out = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
    assert out.shape == (1, 24, 2)
    assert report["pos_embedding"]["from_grid"] == [3, 3]
    assert report["pos_embedding"]["to_grid"] == [4, 6]
    assert report["pos_embedding"]["resampled"]
    want = scipy_zoom(ramp, (4, 6))
    np.testing.assert_allclose(out.reshape(4, 6, 2), want, rtol=1e-5, atol=1e-5)
    # Corners aligned: output (i, j) samples input (i * 2 / 3, j * 2 / 5), where
    # the ramp stays a ramp everywhere (no clamped border).
    sr, sc = np.meshgrid(np.arange(4) * 2 / 3, np.arange(6) * 2 / 5, indexing="ij")
    np.testing.assert_allclose(out.reshape(4, 6, 2)[..., 0], 2.0 * sr + 0.5 * sc,
                               rtol=1e-5, atol=1e-5)
    grid = rng.randn(3, 3, 4)
    flat, abstract = _pos_only(np.concatenate([np.zeros((1, 1, 4)),
                                               grid.reshape(1, 9, 4)], 1), 25)
    out = vit_import.npz_to_encoder_params(flat, abstract)[0]
    np.testing.assert_allclose(
        np.asarray(out["Transformer"]["posembed_input"]["pos_embedding"]).reshape(
            5, 5, 4), scipy_zoom(grid, (5, 5)), rtol=1e-5, atol=1e-5)

    # Downsample 4x4 -> 2x2: shape, and a constant grid stays constant.
    flat, abstract = _pos_only(np.full((1, 17, 3), 0.25), 4)
    out = vit_import.npz_to_encoder_params(flat, abstract)[0]
    np.testing.assert_allclose(
        out["Transformer"]["posembed_input"]["pos_embedding"], np.full((1, 4, 3), 0.25),
        rtol=1e-6)

    # Without `cls` (classifier='gap' files) a square count has no class row.
    flat, abstract = _pos_only(pos[:, 1:], 9, cls=False)
    _, report = vit_import.npz_to_encoder_params(flat, abstract)
    assert not report["pos_embedding"]["cls_row_dropped"]


@pytest.mark.parametrize("problem", ["missing", "misshapen", "extra", "integer"])
def test_each_checkpoint_problem_is_named(problem):
    flat = upstream_npz()
    if problem == "missing":
        key = "Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"
        del flat[key]
        expected = [f"missing {key}", "(64,)"]
    elif problem == "misshapen":
        key = "block2/unit1/conv2/kernel"
        flat[key] = np.zeros((3, 3, 16, 17), np.float32)
        expected = [key, "(3, 3, 16, 17)", "(3, 3, 16, 16)"]
    elif problem == "extra":  # a ResNet unit the model lacks
        key = "block3/unit2/conv1/kernel"
        flat[key] = np.zeros((1, 1, 128, 32), np.float32)
        expected = [f"unexpected {key}"]
    else:
        key = "Transformer/encoder_norm/scale"
        flat[key] = np.ones(D, np.int32)
        expected = [key, "int32"]
    with pytest.raises(ValueError) as err:
        vit_import.npz_to_encoder_params(flat, abstract_encoder(), source="/x/R-mu.npz")
    message = str(err.value)
    assert "/x/R-mu.npz" in message and "1 place(s)" in message
    assert '"vit_size": "mu"' in message  # what the checkpoint's shapes imply
    for part in expected:
        assert part in message


def test_all_problems_are_listed_at_once():
    flat = to_linen_names(upstream_npz())
    del flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/bias"]
    flat["gn_root/scale"] = np.ones(7, np.float32)
    flat["block4/unit1/conv1/kernel"] = np.ones((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="3 place") as err:
        vit_import.npz_to_encoder_params(flat, abstract_encoder(), source="a.npz")
    message = str(err.value)
    assert "missing Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/bias" \
        in message
    assert "shape gn_root/scale: checkpoint (7,) vs model (8,)" in message
    assert "unexpected block4/unit1/conv1/kernel" in message


def test_load_npz_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        vit_import.load_npz(str(tmp_path / "nope.npz"))
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="truncated.npz"):
        vit_import.load_npz(str(bad))
    good = tmp_path / "ok.npz"
    np.savez(good, **{"a/b": np.ones(3, np.float32)})
    assert list(vit_import.load_npz(str(good))) == ["a/b"]


def test_convert_writes_a_checkpoint_restore_collections_reads(tmp_path):
    # The public checkpoints' 32 GroupNorm groups need a root width >= 32.
    flat = upstream_npz(width=32)
    npz = tmp_path / "R-mu.npz"
    np.savez(npz, **flat)
    out = tmp_path / "encoder"
    cfg = encoder_config(resnet_width=32, num_groups=32)
    report = vit_import.convert(str(npz), cfg, str(out))
    assert report["naming"] == "pre-linen" and report["checkpoint"] == str(out / "state")
    assert json.loads((out / "init.json").read_text()) == json.loads(json.dumps(report))

    assert report["architecture"]["resnet_width"] == 32

    model = build_model(cfg)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract["params"])
    restored, provenance = partial.restore_collections(
        str(out), ["encoder"], abstract["params"], shardings)
    want, _ = vit_import.npz_to_encoder_params(flat, abstract["params"]["encoder"])
    chex.assert_trees_all_equal(jax.device_get(restored["encoder"]), want)
    assert provenance["num_params"] == report["num_params"]

    # The stage hand-over reads the converted folder and the raw .npz alike,
    # and records where the encoder came from.
    from ddep_jax.checkpoints import handover

    for source in (str(out), str(npz)):
        got, record = handover.load_collections(source, ["encoder"],
                                                abstract["params"], shardings)
        chex.assert_trees_all_equal(jax.device_get(got["encoder"]), want)
        assert record["num_params"] == report["num_params"]
    assert record["source_init"]["npz_import"]["naming"] == "pre-linen"
    with pytest.raises(ValueError, match="holds an encoder only"):
        handover.load_collections(str(npz), ["encoder", "decoder"],
                                  abstract["params"], shardings)

    with pytest.raises(FileExistsError, match=re.escape(str(out))):
        vit_import.convert(str(npz), cfg, str(out))
    assert sorted(p.name for p in out.iterdir()) == ["init.json", "state"]


def test_groupnorm_groups_other_than_32_are_refused(tmp_path):
    """The group count is in no shape: a 4-group hybrid would load the arrays
    and compute wrong features, so the import refuses it (and names the key)."""
    flat = upstream_npz()
    with pytest.raises(ValueError) as err:
        vit_import.npz_to_encoder_params(flat, abstract_encoder(),
                                         source="/x/R-mu.npz", num_groups=4)
    message = str(err.value)
    assert "/x/R-mu.npz" in message and "1 place(s)" in message
    assert "model.encoder.num_groups=4" in message
    assert "ResNet stems use GroupNorm with 32 groups" in message
    # None = not checked; the plain ViT has no GroupNorm, so any count passes.
    vit_import.npz_to_encoder_params(flat, abstract_encoder(), num_groups=None)
    vit_import.npz_to_encoder_params(upstream_npz(plain=True),
                                     abstract_encoder(plain=True), num_groups=4)
    # `convert` passes model.encoder.num_groups and writes nothing.
    npz = tmp_path / "R-mu.npz"
    np.savez(npz, **flat)
    with pytest.raises(ValueError,
                       match=r"(?s)R-mu\.npz.*model\.encoder\.num_groups=4"):
        vit_import.convert(str(npz), encoder_config(), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_plain_vit_imports_and_transunet_runs():
    flat = upstream_npz(plain=True, pos_grid=2)
    params, report = vit_import.npz_to_encoder_params(flat, abstract_encoder(plain=True))
    assert sorted(params) == ["Transformer", "embedding"]
    assert params["embedding"]["kernel"].shape == (16, 16, 3, D)
    assert report["groupnorm_reshaped"] == 0 and len(report["skipped"]) == 5
    assert report["architecture"]["resnet_layers"] == []
    assert report["architecture"]["patch"] == [16, 16]

    images = np.random.RandomState(2).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    model = build_model(encoder_config(plain=True))
    # Decoder and head: constants of the right shapes (model.init's random
    # initialisers take ~20 s to compile on CPU; their values do not matter here).
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    variables = {"params": {**jax.tree.map(lambda a: jnp.full(a.shape, 0.05, a.dtype),
                                           abstract["params"]), "encoder": params}}
    out, feats = jax.jit(lambda v, x: (model.apply(v, x), model.apply(
        v, x, method=model.encode)))(variables, jnp.asarray(images))
    chex.assert_shape(out, (1, 32, 32, 3))
    chex.assert_tree_all_finite(out)
    assert feats.skips == ()
    tokens, _ = np_encoder(flat, images, plain=True)
    np.testing.assert_allclose(feats.tokens, tokens, rtol=1e-4, atol=1e-4)


def test_encoder_rejects_other_stage_counts():
    enc = hybrid_vit.HybridViT(vit_size="mu", resnet_layers=(1, 1), resnet_width=8,
                               image_size=(32, 32), num_groups=4)
    with pytest.raises(ValueError, match=r"exactly 3 ResNet stages.*or \(\)"):
        jax.eval_shape(enc.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
