"""ONNX export (`python -m ddep_jax.export --format=onnx`, `ddep_jax.checkpoints.onnx_export`).

- The rewritten ops (`onnx_export.REWRITES`): the max pool as strided slices
  equals XLA's reduce-window max exactly; after the rewrite no
  ``reduce_window_max`` / ``stack`` is left; the ops that needed handling
  (the max pool, weight-standardised convolution, the x2 upsampling) run in
  onnxruntime at batch 1 and 3 with JAX's values, and so do tiny random-weight
  models of the noise-conditioned decoder and of ×Net.
- Both encoder families (hybrid R+ViT, plain ResNet U-Net), each a tiny
  CamVid fine-tuning (one step, real images): exported (the hybrid by the
  command line), run by onnxruntime on real CamVid test images at batch 1
  and 3 and compared with the JAX model's logits; the metadata (class
  names, palette, opset) and the dynamic batch axis.
- The same check in a fresh virtual environment with only onnxruntime,
  numpy and pillow (tools/onnx_check/run_onnx.py), and the docs/onnx.md
  snippet run there.

Tolerance (`ATOL`, 1e-3 on logits): both sides compute in float32; they
differ only in summation order (XLA's Eigen / YNNPACK kernels vs
onnxruntime's MLAS, a fused vs unfused normalisation), ~1e-7 relative per
op, compounded through ~20-40 layers and GroupNorm / LayerNorm divisions.
Measured: 3e-5 (tiny models, logits up to ~10); 1e-3 leaves 30x headroom
and is 1000x below the logit margins that decide a class. Argmax: every
pixel whose JAX top-2 margin exceeds 2 * ATOL must agree (there a 1e-3
error cannot flip it); the overall agreement is printed (1.0 so far).
"""

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import venv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, SHARED_DATA, subprocess_env, tiny_finetune_config
from PIL import Image

pytest.importorskip("jax2onnx", reason="ONNX export needs jax2onnx: pip install -e '.[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="pip install -e '.[onnx]'")

from ddep_jax import export  # noqa: E402
from ddep_jax.checkpoints import onnx_export

ATOL = 1e-3
SIZE = (96, 128)  # (H, W): CamVid's 360x480 at 4/15; a multiple of 32 (plain ResNet)
CAMVID_TEST = SHARED_DATA / "camvid" / "test" / "images"
IMAGES = ("0001TP_008550.jpg", "0001TP_008580.jpg", "0001TP_008610.jpg")
RUN_ONNX = REPO / "tools" / "onnx_check" / "run_onnx.py"
FRESH_PACKAGES = ("onnxruntime", "numpy", "pillow")


def _session(proto_or_path):
    data = proto_or_path if isinstance(proto_or_path, str) else \
        proto_or_path.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def compare(reference: np.ndarray, got: np.ndarray, what: str) -> dict:
    """Max abs difference and argmax agreement; asserts the module's
    tolerance (ATOL, and agreement wherever the margin exceeds 2 * ATOL)."""
    assert got.shape == reference.shape and got.dtype == np.float32, what
    diff = float(np.abs(got - reference).max())
    agree = reference.argmax(-1) == got.argmax(-1)
    top2 = np.sort(reference, axis=-1)[..., -2:]
    decided = (top2[..., 1] - top2[..., 0]) > 2 * ATOL
    print(f"{what}: max |logit diff| {diff:.2e} (logits up to "
          f"{np.abs(reference).max():.2f}), argmax agreement {agree.mean():.5f}")
    assert diff <= ATOL, f"{what}: max abs difference {diff} > {ATOL}"
    assert agree[decided].all(), f"{what}: argmax differs where the margin > 2*ATOL"
    return {"max_abs_diff": diff, "agreement": float(agree.mean())}


# ---------------------------------------------------------------- the rewrites


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 7, 9, 3), (3, 3), (2, 2), "SAME"),   # the ResNet root's pool, odd sides
    ((2, 8, 8, 3), (3, 3), (2, 2), "SAME"),
    ((1, 6, 5, 2), (2, 2), (2, 2), "VALID"),
    ((1, 5, 5, 2), (3, 3), (1, 1), "SAME"),
])
def test_max_pool_as_slices_equals_reduce_window(shape, window, strides, padding):
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(0), shape)
    x = x.at[0, 0, :2].set(-5.0)  # negative edges: edge padding must not leak
    want = nn.max_pool(x, window, strides=strides, padding=padding)
    pads = jax.lax.padtype_to_pads(shape, (1, *window, 1), (1, *strides, 1), padding)
    got = onnx_export.max_pool_as_slices(x, (1, *window, 1), (1, *strides, 1), pads)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(NotImplementedError, match="padding"):  # all-padding windows
        onnx_export.max_pool_as_slices(x, (1, 2, 2, 1), (1, 1, 1, 1),
                                       ((0, 0), (2, 0), (0, 0), (0, 0)))


def test_rewrites_leave_no_unconvertible_primitive():
    import flax.linen as nn

    from ddep_jax.models.unet_decoder import upsample2x_bilinear

    def f(x):
        return upsample2x_bilinear(nn.max_pool(jax.nn.relu(x), (3, 3), strides=(2, 2),
                                               padding="SAME"))

    x = jax.random.normal(jax.random.key(1), (2, 8, 10, 4))
    closed = jax.make_jaxpr(f)(x)
    names = lambda jaxpr: {e.primitive.name for e in jaxpr.eqns}  # noqa: E731
    assert {"reduce_window_max", "stack"} <= names(closed.jaxpr)
    rewritten = jax.make_jaxpr(
        lambda x: onnx_export._evaluate(closed.jaxpr, closed.consts, x)[0])(x)
    assert not names(rewritten.jaxpr) & {"reduce_window_max", "stack", "jit",
                                         "custom_jvp_call"}
    np.testing.assert_array_equal(
        np.asarray(onnx_export._evaluate(closed.jaxpr, closed.consts, x)[0]),
        np.asarray(f(x)))


def _special_ops():
    """{name: (function of uint8 images, (H, W))}: the ops that needed
    handling, each alone (weights random)."""
    import flax.linen as nn

    from ddep_jax.models import hybrid_vit, to_float_images, unet_decoder

    key = jax.random.key(2)
    conv = hybrid_vit.StdConv(8, (3, 3), (2, 2), use_bias=False)
    conv_params = conv.init(key, jnp.zeros((1, 16, 16, 3)))
    return {
        # reduce_window_max -> strided slices (MaxPool over NHWC fails in ORT)
        "max_pool_3x3_s2_same": (lambda u: nn.max_pool(
            to_float_images(u), (3, 3), strides=(2, 2), padding="SAME"), (15, 18)),
        # the kernel standardised in the graph (jax2onnx's Conv plugin skips it)
        "weight_standardised_conv": (
            lambda u: conv.apply(conv_params, to_float_images(u)), (16, 16)),
        # stack -> concatenate (no jax2onnx 0.13 lowering); no Resize op
        "upsample2x_bilinear": (lambda u: unet_decoder.upsample2x_bilinear(
            to_float_images(u)), (6, 10)),
    }


@pytest.mark.parametrize("name", ["max_pool_3x3_s2_same", "weight_standardised_conv",
                                  "upsample2x_bilinear"])
def test_special_ops_run_in_onnxruntime(name):
    fn, (h, w) = _special_ops()[name]
    session = _session(onnx_export.convert(fn, (h, w)))
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        images = rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
        got = session.run(None, {onnx_export.INPUT_NAME: images})[0]
        np.testing.assert_allclose(got, np.asarray(fn(images)), atol=1e-5, rtol=0)


RANDOM_MODELS = {
    # the noise-conditioned decoder (sigma's sinusoidal embedding, Dense,
    # swish, FiLM on every GroupNorm) and the ViT's attention
    "conditioned_hybrid": {"model.noise_conditioning": True,
                           "model.clean_noise_level": 0.05},
    # ×Net: Re-shape (LayerNorm, 1x1 conv, depth-to-space), the gated image,
    # a plain ResNet run as the decoder, the Post Feature Pyramid
    "xnet": {"model.architecture": "xnet", "model.xnet.decoder_layers": (1, 1, 1, 1),
             "model.xnet.decoder_width": 8, "model.xnet.pyramid_width": 16},
}


@pytest.mark.parametrize("name", sorted(RANDOM_MODELS))
def test_random_weight_models_convert(name):
    """Tiny models of the other architectures, random weights (noise added
    so that zero-initialised FiLM / gates matter), through onnxruntime at
    batch 1 and 3."""
    config = tiny_finetune_config(**RANDOM_MODELS[name])
    model = onnx_export.export_model(config.model, 11)
    params = model.init(jax.random.key(3), jnp.zeros((1, 32, 64, 3)))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    params = tree.unflatten([p + 0.1 * jax.random.normal(k, p.shape)
                             for p, k in zip(leaves, keys)])
    infer = onnx_export.inference_fn(model, params)
    proto = onnx_export.convert(infer, (32, 64))
    if name == "conditioned_hybrid":
        assert {"Sin", "Cos", "Log"} <= {n.op_type for n in proto.graph.node}
    session = _session(proto)
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 64, 3), dtype=np.uint8)
    want = np.asarray(jax.jit(infer)(images))
    for batch in (1, 3):
        got = session.run(None, {"images": images[:batch]})[0]
        compare(want[:batch], got, f"{name}, batch {batch}")


def test_parse_formats():
    assert export.parse_formats("onnx") == ("onnx",)
    assert export.parse_formats(["onnx", "safetensors"]) == ("safetensors", "onnx")
    assert export.parse_formats("all") == export.FORMATS
    with pytest.raises(ValueError, match="jax_export"):
        export.parse_formats("tflite")


# ------------------------------------------------- fine-tuned models, real data


FAMILIES = {
    "hybrid": {},  # tiny R(1,1,1)+ViT-mu, as tests/test_predict.py's
    "resnet_unet": {"model.encoder.vit_size": "none",
                    "model.encoder.resnet_layers": (1, 1, 1, 1),
                    "eval.size_multiple": 32},
}


def camvid_images() -> np.ndarray:
    """uint8 [3, H, W, 3]: three CamVid test images resized to SIZE."""
    if not all((CAMVID_TEST / n).is_file() for n in IMAGES):
        pytest.skip(f"CamVid test images not found in {CAMVID_TEST}: put the shared "
                    "data beside the repo (../shared/data/camvid).")
    return np.stack([np.asarray(Image.open(CAMVID_TEST / n).convert("RGB").resize(
        (SIZE[1], SIZE[0]), Image.BILINEAR)) for n in IMAGES])


def export_finetuned(family: str, tmp_path, data_dir: str) -> dict:
    """A tiny CamVid fine-tuning of the family (checkpoint after step 1),
    exported to ONNX at SIZE, and the JAX model's logits on the three CamVid
    images: {'family', 'workdir', 'out', 'onnx', 'images', 'jax_logits',
    'batch1_logits', 'seconds'}."""
    from ddep_jax.evaluation.segmentation import load_finetuned
    from ddep_jax.models import to_float_images
    from ddep_jax.trainers import loop

    images = camvid_images()
    workdir = str(tmp_path / "workdir")
    loop.run(tiny_finetune_config(total_steps=2, **{
        "data.data_dir": data_dir, "eval.final_splits": (),
        "eval.num_visualize": 0, **FAMILIES[family]}), workdir, stop_after_step=1)
    out = tmp_path / "export"
    import time

    t0 = time.perf_counter()
    if family == "hybrid":  # the command line
        res = subprocess.run(
            [sys.executable, "-m", "ddep_jax.export", f"--workdir={workdir}",
             f"--output={out}", "--format=onnx", f"--size={SIZE[0]},{SIZE[1]}"],
            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"onnx: {out / 'model.onnx'}" in res.stdout
    else:
        paths = export.export(workdir, str(out), size=SIZE, formats=("onnx",))
        assert set(paths) == {"model", "card", "onnx"}
    seconds = time.perf_counter() - t0
    run = load_finetuned(workdir)  # the model as trained (its own model.conv)
    apply = jax.jit(lambda x: run["model"].apply({"params": run["params"]},
                                                 to_float_images(x), train=False))
    return {"family": family, "workdir": workdir, "out": out,
            "onnx": str(out / "model.onnx"), "images": images,
            "jax_logits": np.asarray(apply(images)), "seconds": seconds,
            "batch1_logits": np.asarray(apply(images[:1]))}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_onnx_export_of_a_finetuned_model(family, camvid_tfds, fresh_python, tmp_path):
    """One test per family (one fine-tuning, also under pytest-xdist): the
    ONNX model against JAX, then in the fresh environment (the hybrid also
    runs the docs snippet there)."""
    exported = export_finetuned(family, tmp_path, camvid_tfds)
    check_onnx_matches_jax(exported)
    check_fresh_environment(exported, fresh_python, tmp_path / "fresh")
    if family == "hybrid":  # the snippet is model-independent
        check_docs_snippet(exported, fresh_python, tmp_path / "snippet")


def check_onnx_matches_jax(exported):
    family = exported["family"]
    print(f"{family}: export (process incl. checkpoint load) {exported['seconds']:.1f} s")
    out = exported["out"]
    assert sorted(os.listdir(out)) == ["MODEL_CARD.md", "model.json", "model.onnx"]
    session = _session(exported["onnx"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(uint8)",
                                                   [*SIZE, 3])
    assert isinstance(inp.shape[0], str)  # the dynamic batch axis
    assert (outp.name, outp.shape[1:]) == ("logits", [*SIZE, 11])
    images, want = exported["images"], exported["jax_logits"]
    got1 = session.run(None, {"images": images[:1]})[0]
    compare(exported["batch1_logits"], got1, f"{family}, batch 1")
    got3 = session.run(None, {"images": images})[0]
    compare(want, got3, f"{family}, batch 3")

    import onnx

    proto = onnx.load(exported["onnx"])
    meta = onnx_export.read_metadata(proto)
    from ddep_jax.data.seg_datasets import spec_for

    spec = spec_for(tiny_finetune_config().data)
    assert json.loads(meta["class_names"]) == list(spec.class_names)
    assert json.loads(meta["palette"]) == [list(c) for c in spec.class_colors]
    assert meta["opset"] == str(onnx_export.DEFAULT_OPSET)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [
        onnx_export.DEFAULT_OPSET]
    record = json.loads((out / "model.json").read_text())
    assert record["onnx"]["opset"] == onnx_export.DEFAULT_OPSET
    assert record["onnx"]["input"]["shape"] == ["b", *SIZE, 3]
    assert "exported" not in record and "model.onnx" in (out / "MODEL_CARD.md").read_text()


# ------------------------------------------------ a fresh environment, no JAX


@pytest.fixture(scope="session")
def fresh_python(request, tmp_path_factory):
    """The python of a virtual environment holding only FRESH_PACKAGES (and
    their dependencies), built once and kept in pytest's cache folder
    (.pytest_cache; cold: ~10 s with pip's wheel cache). Skips where pip
    cannot install them (no package index)."""
    cache = getattr(request.config, "cache", None)
    root = (cache.mkdir("onnx_fresh_venv") if cache is not None
            else tmp_path_factory.mktemp("onnx_fresh_venv"))
    env_dir, python = root / "venv", root / "venv" / "bin" / "python"
    with open(root / "lock", "w") as lock:  # pytest-xdist: one builder
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "ready").is_file():
            shutil.rmtree(env_dir, ignore_errors=True)
            venv.create(env_dir, with_pip=True, clear=True)
            res = subprocess.run([str(python), "-m", "pip", "install", "-q",
                                  "--disable-pip-version-check", *FRESH_PACKAGES],
                                 capture_output=True, text=True, timeout=600)
            if res.returncode:
                pytest.skip("cannot build the fresh onnxruntime environment "
                            f"(pip install {' '.join(FRESH_PACKAGES)}): "
                            f"{res.stderr.strip()[-500:]}")
            (root / "ready").write_text(" ".join(FRESH_PACKAGES))
    # Nothing of JAX or this project there.
    probe = ("import importlib.util as u; "
             "print([m for m in ('jax', 'jaxlib', 'flax', 'ddep_jax', 'jax2onnx') "
             "if u.find_spec(m)])")
    res = subprocess.run([str(python), "-c", probe], capture_output=True, text=True,
                         cwd="/", env=_clean_env())
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr
    return str(python)


def _clean_env() -> dict:
    """An environment without this project's PYTHONPATH or virtualenv."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def check_fresh_environment(exported, fresh_python, tmp_path):
    """tools/onnx_check/run_onnx.py in the fresh environment: the three CamVid
    images as PNGs at the model's size, in batches of 3 and of 1."""
    tmp_path.mkdir()
    paths = []
    for name, image in zip(IMAGES, exported["images"]):
        paths.append(str(tmp_path / name.replace(".jpg", ".png")))
        Image.fromarray(image).save(paths[-1])
    for batch in (3, 1):
        logits = tmp_path / f"logits_b{batch}.npy"
        res = subprocess.run(
            [fresh_python, str(RUN_ONNX), "--model", exported["onnx"], "--images",
             *paths, "--batch", str(batch), "--logits", str(logits),
             "--labels", str(tmp_path / "labels")],
            capture_output=True, text=True, cwd=tmp_path, env=_clean_env(), timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "11 classes: Sky, Building" in res.stdout, res.stdout
        compare(exported["jax_logits"], np.load(logits),
                f"{exported['family']}, fresh environment, batches of {batch}")
    labels = np.asarray(Image.open(tmp_path / "labels" / "0001TP_008550_labels.png"))
    assert labels.shape == SIZE


def check_docs_snippet(exported, fresh_python, tmp_path):
    """The first ```python block of docs/onnx.md, run as written in the fresh
    environment beside model.onnx and image.jpg: its labels.png is the JAX
    model's argmax (same resize: PIL bilinear to the model's size)."""
    tmp_path.mkdir()
    text = (REPO / "docs" / "onnx.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert len(snippet.strip().splitlines()) <= 12, "docs/onnx.md: about ten lines"
    shutil.copy(exported["onnx"], tmp_path / "model.onnx")
    shutil.copy(CAMVID_TEST / IMAGES[0], tmp_path / "image.jpg")
    (tmp_path / "snippet.py").write_text(snippet)
    res = subprocess.run([fresh_python, "snippet.py"], capture_output=True, text=True,
                         cwd=tmp_path, env=_clean_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    labels = np.asarray(Image.open(tmp_path / "labels.png"))
    reference = exported["batch1_logits"][0]
    top2 = np.sort(reference, axis=-1)[..., -2:]
    decided = (top2[..., 1] - top2[..., 0]) > 2 * ATOL
    assert labels.shape == SIZE
    assert (labels == reference.argmax(-1))[decided].all()
