"""Train-step benchmark of the three stages at the paper's and the CPU recipes'
configurations.

--recipe=paper (default):
  stage 1 classify: configs/classify_imagenet21k.py (R50+ViT-B/16 classifier,
                    224x224, 21843 classes, sigmoid cross-entropy)
  stage 2 ddep:     configs/ddep_imagenet21k.py (R50+ViT-B/16 frozen encoder +
                    1x UNet decoder, 224x224, scaled noise, eps target)
  stage 3 finetune: configs/finetune_cityscapes.py (1024x1024 crops, 19 classes;
                    the model is built for the encoder's 224x224 and fed the
                    crop, its position embedding resampled, as in training)
--recipe=cpu (what runs on a 2-core CPU; the configs' own batch sizes):
  stage 1 classify: configs/classify_cifar10.py (32x32, batch 128)
  stage 2 ddep:     configs/ddep_camvid.py (96x96, batch 16)
  stage 3 finetune: configs/finetune_camvid.py (96x96 crops, batch 8)
  With --loop_steps=N each stage also runs the real training loop
  (`loop.run`, its prepared dataset and input pipeline, logging) for N steps
  in a temporary workdir, and prints the loop's steps/s next to the bare
  step's (datasets not prepared: said, and skipped).

Every stage is built as `loop.run` builds it, without a dataset:
`loop.trainer(name).stage(config, mesh, None, data=False)`, its optimizer and
sharded state (`loop.build_state`), the shared step (`loop.jit_train_step`:
(state, batch dict, key) -> (state, metrics)), and a random valid batch of
its `batch_spec` (`Stage.example_batch`). The flags only set config keys.

For each stage it prints devices, dtype, batch, parameter counts, XLA's FLOPs
per example and per step, XLA's per-device memory (arguments, temporaries,
peak), compile time, the median step time over --steps timed steps after
--warmup steps, images/s, achieved FLOP/s and the model FLOPs utilisation
against (a) this device's dense n x n matmul throughput in the compute dtype,
measured in the same run, and (b) the vendor's nominal dense peak where the
device kind is a known accelerator. A human-readable block, then one
`RESULT {json}` line per stage. Not a test: run it by hand, record figures.

  python benchmarks/train_step.py                        # all three, small batch
  python benchmarks/train_step.py --stages=ddep --batch=ddep:8
  python benchmarks/train_step.py --compile_only --paper_devices=16
      # FLOPs and memory at the paper's global batch over 16 devices (e.g. a
      # v4-32 slice), compiled for one device: the per-device program
  python benchmarks/train_step.py --max_batch --compile_only   # GPU / TPU
  python benchmarks/train_step.py --image_size=64 --steps=1    # smoke run
  python benchmarks/train_step.py --stages=ddep,finetune --decoder_widths=512,256,128,64,16
      # TransUNet's own decoder widths instead of the config's
  python benchmarks/train_step.py --recipe=cpu --loop_steps=60
      # the CPU recipes: bare step and the training loop with real data
  python benchmarks/train_step.py --recipe=cpu --profile_steps=3
      # and where a step's time goes: XLA's ops by kind (jax.profiler trace)

FLOPs are XLA's cost analysis of the compiled step, which counts a loop
body once. So on CPU the step is built and compiled a second time from a
copy of the config with `model.conv='xla'` for the count (there 'auto' computes
a convolution's kernel gradient in a loop over kernel taps; the
plain-convolution step is the same math), and with --grad_accum_steps > 1 (a
lax.scan over micro-batches) the count is taken from the step without
accumulation (`grad_accum_steps=1`, plain convolutions) at the same global
batch. Memory is read from the step that runs: XLA's per-device
arguments + outputs - donated + temporaries, or its own peak where larger
(`profiling.compiled_report`). The state is donated, inputs are placed on the
devices once before timing, and nothing is fetched to the host inside the
timed loop (each step is waited for with block_until_ready).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec as P

from ddep_jax.training import profiling
from ddep_jax.parallel.sharding import make_mesh
from ddep_jax.trainers import loop

REPO = Path(__file__).resolve().parent.parent
STAGES = ("classify", "ddep", "finetune")
STAGE_NUMBER = {"classify": 1, "ddep": 2, "finetune": 3}
RECIPES = {
    "paper": {"classify": "configs/classify_imagenet21k.py",
              "ddep": "configs/ddep_imagenet21k.py",
              "finetune": "configs/finetune_cityscapes.py"},
    "cpu": {"classify": "configs/classify_cifar10.py",
            "ddep": "configs/ddep_camvid.py",
            "finetune": "configs/finetune_camvid.py"},
}
# Paper recipe, small enough for a 2-core CPU (224x224 for stages 1-2,
# 1024x1024 for 3); the CPU recipe runs its configs' own batch sizes.
DEFAULT_BATCH = {"paper": {"classify": 2, "ddep": 2, "finetune": 1}, "cpu": {}}
SCHEDULE_STEPS = 1000  # the learning-rate schedule's length: no effect on speed

_STAGES = flags.DEFINE_list("stages", list(STAGES), f"Stages to run, of {STAGES}.")
_RECIPE = flags.DEFINE_enum("recipe", "paper", list(RECIPES),
                            "Which configs: the paper's or the CPU recipes'.")
_LOOP_STEPS = flags.DEFINE_integer(
    "loop_steps", 0,
    "> 0: also run the training loop with real data for this many steps "
    "(--recipe=cpu; steps/s from the log intervals after the first).")
_LOOP_LOG_EVERY = flags.DEFINE_integer("loop_log_every", 10,
                                       "The loop's log period (its rate interval).")
_BATCH_PER_DEVICE = flags.DEFINE_integer(
    "batch_per_device", None,
    f"Per-device batch of every stage (default per stage: {DEFAULT_BATCH}; "
    "'cpu': the config's).")
_BATCH = flags.DEFINE_string(
    "batch", "", "Per-stage per-device batch overrides, e.g. 'ddep:8,finetune:1'.")
_PAPER_DEVICES = flags.DEFINE_integer(
    "paper_devices", 0,
    "> 0: per-device batch = the config's (paper) global batch / this many "
    "devices (classify 4096, ddep 512, finetune 16), unless --batch names the "
    "stage. Useful with --compile_only.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "config.model.dtype (compute); params stay float32.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps before timing.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile and report FLOPs and memory; run nothing.")
_MAX_BATCH = flags.DEFINE_bool(
    "max_batch", False,
    "Find the largest per-device batch whose compiled peak memory fits in the "
    "device's bytes_limit (doubling, then bisecting; compile-only).")
_MAX_BATCH_CAP = flags.DEFINE_integer("max_batch_cap", 4096,
                                      "Largest per-device batch --max_batch tries.")
_MEMORY_LIMIT_GIB = flags.DEFINE_float(
    "memory_limit_gib", 0.0,
    "> 0: the per-device memory --max_batch fits in, instead of the device's "
    "memory_stats()['bytes_limit'] (what-if figures, or CPU).")
_GRAD_ACCUM = flags.DEFINE_integer(
    "grad_accum_steps", 0,
    "> 0: config.grad_accum_steps (0 keeps the config's).")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 0,
    "> 0: square input size for smoke runs (classify: data and encoder size; "
    "ddep: encoder size; finetune: crop size).")
_DECODER_WIDTHS = flags.DEFINE_string(
    "decoder_widths", "",
    "5 comma-separated ints, e.g. 512,256,128,64,16 (TransUNet's decoder): "
    "config.model.decoder_widths of the ddep and finetune stages, with "
    "model.decoder_num_groups lowered to the largest count dividing the config's "
    "and every width (GroupNorm; 16 for that example); '' keeps the config's.")
_CONV = flags.DEFINE_enum("conv", "", ["", "auto", "xla", "tap_gemm"],
                          "config.model.conv ('' keeps the config's).")
_CPU_DOT_FUSION = flags.DEFINE_enum(
    "cpu_dot_fusion", "", ["", "ynn", "xla"],
    "config.model.cpu_dot_fusion ('' keeps the config's): YNNPACK's or XLA's dots on CPU.")
_DEVICES = flags.DEFINE_integer("devices", 1, "Devices on the 'data' mesh axis.")
_PARAM_SHARDING = flags.DEFINE_string(
    "param_sharding", "", "'' keeps the config's; 'replicated' or 'fsdp'.")
_CLASSIFY_CLASSES = flags.DEFINE_integer(
    "classify_classes", 21843,
    "Stage-1 classes: 21843 is ImageNet-21k (fall 2011) of the public "
    "R50+ViT-B/16 checkpoints; this project's imagenet21k builder (winter 2021) "
    "has 19167.")
_MATMUL_N = flags.DEFINE_integer(
    "matmul_n", 0, "n of the n x n matmul peak; 0: 4096 on CPU, 16384 otherwise.")
_MATMUL_REPS = flags.DEFINE_integer("matmul_reps", 10, "Matmul peak: best of N.")
_SEED = flags.DEFINE_integer("seed", 0, "Parameter and input seed.")
_PROFILE_STEPS = flags.DEFINE_integer(
    "profile_steps", 0, "After timing, trace this many steps with jax.profiler "
    "and print XLA's op time per step by kind of op (profiling.op_breakdown).")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", "", "Where --profile_steps writes its traces (one folder per "
    "stage; TensorBoard's profile plugin or ui.perfetto.dev read them); default "
    "a temporary folder, printed.")
_PROFILE_TOP = flags.DEFINE_integer("profile_top", 15, "Op kinds printed.")


# ----------------------------------------------------------------------------
# Nominal dense peaks (no 2:4 sparsity) per device, TFLOP/s, keyed by what
# `jax.devices()[0].device_kind` says.
#
# NVIDIA datasheets list tensor-core figures *with sparsity* ("specifications
# 1/2 lower without sparsity"): H100 SXM BF16 1,979, TF32 989, FP32 (no tensor
# cores) 67; H100 PCIe 1,513 / 756 / 51
# (https://www.nvidia.com/en-us/data-center/h100/, datasheet; table also at
# https://glennklockwood.com/garden/processors/h100: BF16 matrix 989.4, TF32
# 494.7, FP32 66.9 dense). H200 SXM is the same GH100 compute with HBM3e
# (https://www.nvidia.com/en-us/data-center/h200/: BF16 1,979 with sparsity,
# ~989 dense). A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf):
# BF16 312, TF32 156, FP32 19.5 dense. Google Cloud TPU docs, "peak compute per
# chip (bf16)": v4 275 (https://cloud.google.com/tpu/docs/v4), v5e 197
# (https://cloud.google.com/tpu/docs/v5e), v5p 459
# (https://cloud.google.com/tpu/docs/v5p), v6e / Trillium 918
# (https://cloud.google.com/tpu/docs/v6e). JAX names them 'TPU v4',
# 'TPU v5 lite', 'TPU v5', 'TPU v6 lite' (one device per chip).
# ----------------------------------------------------------------------------
_GPU_PEAKS = (  # (substring of the lower-cased device kind, {mode: TFLOP/s})
    ("h100 pcie", {"bfloat16": 756.0, "tensorfloat32": 378.0, "float32": 51.0}),
    ("h100", {"bfloat16": 989.4, "tensorfloat32": 494.7, "float32": 66.9}),  # SXM
    ("h200", {"bfloat16": 989.4, "tensorfloat32": 494.7, "float32": 66.9}),  # SXM
    ("a100", {"bfloat16": 312.0, "tensorfloat32": 156.0, "float32": 19.5}),
)
_TPU_BF16_PEAKS = {"tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0,
                   "tpu v5": 459.0, "tpu v5p": 459.0, "tpu v6 lite": 918.0,
                   "tpu v6e": 918.0}


def nominal_peak(device, dtype: str) -> tuple[float | None, str]:
    """(dense peak FLOP/s of one device for `dtype` matmuls, what it is).

    float32 matmuls run at JAX's default precision: TF32 tensor cores on
    Ampere and later GPUs, one bfloat16 pass on TPU (docs.jax.dev, "Matmul
    precision"); with jax_default_matmul_precision 'highest' / 'float32'
    they run in full float32 (on TPU as 6 bfloat16 passes: peak / 6, rough).
    """
    kind = device.device_kind.lower()
    precision = str(jax.config.jax_default_matmul_precision or "default").lower()
    full_f32 = precision in ("highest", "float32", "f32_f32_f32")
    three_pass = precision in ("high", "tensorfloat32", "bf16_bf16_f32_x3")
    if device.platform == "gpu" or device.platform == "cuda":
        if "nvl" in kind:  # H100 / H200 NVL: other clocks, not in the table
            return None, f"no nominal peak for {device.device_kind!r}"
        for name, peaks in _GPU_PEAKS:
            if name in kind:
                if dtype == "bfloat16":
                    return peaks["bfloat16"] * 1e12, "bf16 dense tensor core"
                if full_f32:
                    return peaks["float32"] * 1e12, "fp32 (no tensor cores)"
                return peaks["tensorfloat32"] * 1e12, "tf32 dense (JAX default f32)"
        return None, f"no nominal peak for {device.device_kind!r}"
    if device.platform == "tpu":
        peak = _TPU_BF16_PEAKS.get(kind)
        if peak is None:
            return None, f"no nominal peak for {device.device_kind!r}"
        if dtype == "bfloat16" or not (full_f32 or three_pass):
            return peak * 1e12, "bf16 peak per chip"
        passes = 6 if full_f32 else 3
        return peak * 1e12 / passes, f"bf16 peak / {passes} passes (f32 '{precision}')"
    return None, f"no nominal peak for {device.platform}"


def matmul_peak(dtype: str, n: int, reps: int) -> float:
    """Best-of-`reps` [n, n] @ [n, n] throughput in `dtype`, FLOP/s (device 0)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def device_memory_limit() -> int | None:
    """--memory_limit_gib, else bytes_limit of device 0's allocator, else None
    (the backend says nothing)."""
    if _MEMORY_LIMIT_GIB.value > 0:
        return int(_MEMORY_LIMIT_GIB.value * 2**30)
    try:
        stats = jax.devices()[0].memory_stats()
    except (NotImplementedError, RuntimeError, AttributeError):
        stats = None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


# ----------------------------------------------------------------------------
# Stages: each built as the training loop builds it (`loop.trainer(name).stage`
# without data, `loop.build_state`, `loop.jit_train_step`). What differs per
# stage is only which config keys the flags below set.
# ----------------------------------------------------------------------------
IMAGE_SIZE_KEYS = {"classify": ("data.image_size", "model.encoder.image_size"),
                   "ddep": ("model.encoder.image_size",),
                   "finetune": ("data.crop_size",)}
"""The config keys --image_size sets (square), per stage."""
DECODER_WIDTHS_STAGES = ("ddep", "finetune")
"""The stages whose model has a decoder: --decoder_widths sets theirs."""
NUM_OUTPUTS_FLAGS = {"classify": _CLASSIFY_CLASSES}
"""The flag giving `model.num_outputs` where the config leaves it 0 (the
dataset's class count, which a stage built without data may not know)."""


def config_file(stage: str) -> str:
    return RECIPES[_RECIPE.value][stage]


def load_config(stage: str):
    path = REPO / config_file(stage)
    spec = importlib.util.spec_from_file_location(f"_train_step_config_{stage}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(None)


def decoder_widths() -> tuple[int, ...]:
    """--decoder_widths as 5 ints; () when empty."""
    text = _DECODER_WIDTHS.value.strip()
    if not text:
        return ()
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) != 5 or min(widths) < 1:
        raise app.UsageError(f"--decoder_widths={text!r}: expected 5 positive "
                             "comma-separated ints, e.g. 512,256,128,64,16.")
    return widths


def make_config(name: str, per_device_batch: int, num_devices: int,
                grad_accum: int | None = None):
    """The stage's paper config with the flags' overrides; `grad_accum`
    overrides --grad_accum_steps."""
    config = load_config(name)
    per_device_batch = per_device_batch or config.batch_size // num_devices
    config.batch_size = per_device_batch * num_devices
    config.model.dtype = _DTYPE.value
    config.mesh.data = num_devices
    if _PARAM_SHARDING.value:
        config.mesh.param_sharding = _PARAM_SHARDING.value
    if _CONV.value:
        config.model.conv = _CONV.value
    if _CPU_DOT_FUSION.value:
        config.model.cpu_dot_fusion = _CPU_DOT_FUSION.value
    grad_accum = _GRAD_ACCUM.value if grad_accum is None else grad_accum
    if grad_accum:
        config.grad_accum_steps = grad_accum
    overrides = {}
    if _IMAGE_SIZE.value:
        size = (_IMAGE_SIZE.value, _IMAGE_SIZE.value)
        overrides.update({key: size for key in IMAGE_SIZE_KEYS[name]})
    widths = decoder_widths()
    if widths and name in DECODER_WIDTHS_STAGES:
        overrides["model.decoder_widths"] = widths
        overrides["model.decoder_num_groups"] = math.gcd(
            config.model.decoder_num_groups, *widths)
    if (name in NUM_OUTPUTS_FLAGS and not config.model.num_outputs
            and _RECIPE.value == "paper"):  # the CPU recipes: the dataset's classes
        overrides["model.num_outputs"] = NUM_OUTPUTS_FLAGS[name].value
    config.update_from_flattened_dict(overrides)
    return config


@dataclasses.dataclass(frozen=True)
class Bench:
    """One stage's train step at one config, as `loop.run` builds it."""

    name: str
    config: object
    mesh: object
    stage: loop.Stage
    state: loop.TrainState

    @property
    def global_batch(self) -> int:
        return int(self.config.batch_size)

    @property
    def grad_accum_steps(self) -> int:
        return int(self.config.grad_accum_steps)

    @property
    def input_hw(self) -> tuple[int, int]:
        return tuple(self.stage.batch_spec["image"].shape[1:3])

    def param_counts(self) -> tuple[int, int]:
        params = self.state.abstract["params"]
        size = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
        return (sum(size(v) for k, v in params.items() if k not in self.stage.frozen),
                size(params))

    def description(self) -> str:
        """The model (from its config and parameter tree), then the stage's
        summary."""
        m, params = self.config.model, self.state.abstract["params"]
        layers = tuple(m.encoder.resnet_layers)
        resnet = {(3, 4, 9): "R50+", (): ""}.get(layers, f"R{layers}+")
        text = f"{resnet}ViT-{m.encoder.vit_size}/16 encoder"
        if "decoder" in params:
            text += " + " + (f"decoder {tuple(m.decoder_widths)} (GroupNorm "
                             f"{m.decoder_num_groups} groups)" if m.decoder_widths
                             else f"{m.decoder_multiplier}x decoder")
        text += f", {params['head']['kernel'].shape[-1]}-output head, "
        text += (f"{' + '.join(self.stage.frozen)} frozen" if self.stage.frozen
                 else "everything trained")
        built = tuple(self.stage.init_inputs[0].shape[1:3])
        if built != self.input_hw:
            text += f"; built for {built[0]}x{built[1]}"
        return f"{text}; {self.stage.summary}"

    def abstract_args(self) -> tuple:
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             self.state.abstract, self.state.sharding)
        return state, loop.global_batch_spec(self.stage, self.mesh), replicated_key(self.mesh)

    def compile(self):
        """(compiled step, seconds to lower and compile)."""
        t = time.perf_counter()
        jitted = loop.jit_train_step(self.stage, self.state, self.config, self.mesh)
        compiled = jitted.lower(*self.abstract_args()).compile()
        return compiled, time.perf_counter() - t

    def report(self, compiled) -> dict:
        return profiling.compiled_report(compiled, self.global_batch,
                                         self.mesh.shape["data"])


def replicated_key(mesh):
    return jax.device_put(jax.random.key(1), NamedSharding(mesh, P()))


def build(name: str, config, mesh) -> Bench:
    stage = loop.trainer(name).stage(config, mesh, None, data=False)
    state = loop.build_state(stage, config, SCHEDULE_STEPS, mesh,
                             jax.random.key(_SEED.value))
    return Bench(name, config, mesh, stage, state)


def compiled_peak_bytes(bench: Bench) -> int:
    compiled, _ = bench.compile()
    report = bench.report(compiled)
    if not report["memory"]:
        raise RuntimeError("the backend gives no memory analysis")
    return report["memory"]["peak"]


def find_max_batch(name: str, mesh, limit: int, unit: int) -> tuple[int, list]:
    """Largest per-device batch (a multiple of `unit`, the accumulation steps)
    whose compiled peak fits in `limit` bytes: doubling, then bisection to ~3%."""
    probes = []

    def fits(k: int) -> bool:
        b = k * unit
        peak = compiled_peak_bytes(build(name, make_config(name, b, mesh.shape["data"]),
                                         mesh))
        probes.append((b, peak))
        print(f"  max_batch probe: per-device batch {b}: peak "
              f"{peak / profiling.GIB:.2f} GiB {'fits' if peak <= limit else 'too big'}",
              flush=True)
        return peak <= limit

    lo, hi, k = 0, None, 1
    while k * unit <= _MAX_BATCH_CAP.value:
        if not fits(k):
            hi = k
            break
        lo, k = k, k * 2
    if hi is None:
        return lo * unit, probes
    while hi - lo > max(1, lo // 32):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo * unit, probes


# ----------------------------------------------------------------------------
# Running and reporting.
# ----------------------------------------------------------------------------
def per_device_batch(name: str, overrides: dict) -> int:
    if name in overrides:
        return overrides[name]
    if _PAPER_DEVICES.value:
        paper = int(load_config(name).batch_size)
        if paper % _PAPER_DEVICES.value:
            raise ValueError(f"{name}: paper batch {paper} is not divisible by "
                             f"--paper_devices={_PAPER_DEVICES.value}.")
        return paper // _PAPER_DEVICES.value
    return _BATCH_PER_DEVICE.value or DEFAULT_BATCH[_RECIPE.value].get(name, 0)


def parse_batch_overrides(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition(":")
        if name not in STAGES or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--batch item {item!r}: expected <stage>:<n> with stage "
                             f"in {STAGES} and n >= 1.")
        out[name] = int(value)
    return out


_MATMUL_CACHE: dict = {}


def measured_peak(dtype: str) -> tuple[float, int]:
    n = _MATMUL_N.value or (4096 if jax.default_backend() == "cpu" else 16384)
    if dtype not in _MATMUL_CACHE:
        _MATMUL_CACHE[dtype] = matmul_peak(dtype, n, _MATMUL_REPS.value)
    return _MATMUL_CACHE[dtype], n


def run_stage(name: str, batch: int, mesh) -> dict:
    num_devices = mesh.shape["data"]
    device = mesh.devices.flat[0]
    bench = build(name, make_config(name, batch, num_devices), mesh)
    batch = bench.global_batch // num_devices
    trainable, total = bench.param_counts()
    compiled, compile_s = bench.compile()
    report = bench.report(compiled)
    # FLOPs: XLA counts a loop body once. On CPU the count comes from the step
    # with plain convolutions (model.conv='xla'; 'auto' loops over kernel taps
    # for the kernel gradient there); with gradient accumulation (a lax.scan
    # over micro-batches), from the step without it at the same global batch.
    accumulating = bench.grad_accum_steps > 1
    if jax.default_backend() == "cpu" or accumulating:
        flops_config = bench.config.copy_and_resolve_references()
        flops_config.model.conv = "xla"
        flops_config.grad_accum_steps = 1
        flops_bench = build(name, flops_config, mesh)
        flops_compiled, _ = flops_bench.compile()
        flops_report = flops_bench.report(flops_compiled)
        del flops_compiled, flops_bench
        for k in ("flops_per_step", "flops_per_example", "bytes_accessed"):
            report[k] = flops_report[k]
    limit = device_memory_limit()
    result = {
        "stage": name, "config": config_file(name), "recipe": _RECIPE.value,
        "platform": device.platform,
        "device_kind": device.device_kind, "num_devices": num_devices,
        "dtype": _DTYPE.value, "param_sharding": bench.config.mesh.param_sharding,
        "batch_per_device": batch, "global_batch": bench.global_batch,
        "grad_accum_steps": bench.grad_accum_steps,
        "image_hw": list(bench.input_hw), "params_trainable": trainable,
        "params_total": total, "flops_per_step": report["flops_per_step"],
        "flops_per_example": report["flops_per_example"],
        "bytes_accessed_per_device": report["bytes_accessed"],
        "memory_per_device": report["memory"], "device_memory_limit": limit,
        "compile_s": round(compile_s, 2), "compile_only": _COMPILE_ONLY.value,
    }

    if _MAX_BATCH.value:
        if limit is None:
            result["max_batch_per_device"] = None
            result["max_batch_note"] = (f"{device.platform} reports no memory_stats "
                                        "bytes_limit: skipped")
        else:
            best, probes = find_max_batch(name, mesh, limit, bench.grad_accum_steps)
            result["max_batch_per_device"] = best
            result["max_batch_probes"] = probes

    if not _COMPILE_ONLY.value:
        rng = np.random.RandomState(_SEED.value)
        batch_sharding = NamedSharding(mesh, P("data"))
        inputs = {k: jax.device_put(v, batch_sharding)
                  for k, v in bench.stage.example_batch(rng).items()}
        key = replicated_key(mesh)
        state = bench.state.init(jax.random.key(_SEED.value))
        metrics = None
        for _ in range(_WARMUP.value):
            state, metrics = compiled(state, inputs, key)
        jax.block_until_ready((state, metrics))
        times = []
        for _ in range(_STEPS.value):
            t = time.perf_counter()
            state, metrics = compiled(state, inputs, key)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t)
        loss = float(jax.device_get(metrics["loss"])) if metrics is not None else None
        if _PROFILE_STEPS.value:
            result["profile"] = profile_steps(name, compiled, state, inputs, key)
        del state
        if times:
            step_s = float(np.median(times))
            achieved = report["flops_per_step"] / step_s / num_devices  # per device
            peak, n = measured_peak(_DTYPE.value)
            nominal, nominal_what = nominal_peak(device, _DTYPE.value)
            result.update({
                "steps": len(times), "warmup": _WARMUP.value,
                "step_s_median": step_s, "step_s_min": min(times),
                "step_s_max": max(times),
                "images_per_s": bench.global_batch / step_s,
                "achieved_flops_per_s_per_device": achieved,
                "matmul_peak_flops_per_s": peak, "matmul_n": n,
                "mfu_matmul": achieved / peak,
                "nominal_peak_flops_per_s": nominal, "nominal_peak": nominal_what,
                "mfu_nominal": achieved / nominal if nominal else None,
            })
        result["loss"] = loss
    if _LOOP_STEPS.value and not _COMPILE_ONLY.value:
        result.update(run_loop(bench))
        if "loop_steps_per_s" in result and "step_s_median" in result:
            result["loop_vs_bare"] = result["loop_steps_per_s"] * result["step_s_median"]
    print_block(bench, result)
    return result


def profile_steps(name: str, compiled, state, inputs, key) -> dict:
    """--profile_steps steps under `jax.profiler.trace`; returns {'dir',
    'step_s' (traced, tracing included), 'ops' (`profiling.op_breakdown`)}."""
    root = _PROFILE_DIR.value or tempfile.mkdtemp(prefix="train_step_profile_")
    log_dir = str(Path(root) / name)
    num = _PROFILE_STEPS.value
    start = time.perf_counter()
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(num):
            state, metrics = compiled(state, inputs, key)
            jax.block_until_ready((state, metrics))
        traced_s = (time.perf_counter() - start) / num
    return {"dir": log_dir, "steps": num, "step_s": traced_s,
            "ops": profiling.op_breakdown(log_dir, num)}


def run_loop(bench: Bench) -> dict:
    """The real training loop of `bench`'s config for --loop_steps steps in a
    temporary workdir: `loop.run` with the stage's dataset and input pipeline,
    logging every --loop_log_every steps, no image grids, no periodic
    evaluation (and, as the run stops early, no final one). Returns the loop's
    steps/s (median of the logged intervals after the first, which holds the
    compile) next to the bare step's, or a note when the data is missing."""
    config = bench.config.copy_and_resolve_references()
    config.log_every = _LOOP_LOG_EVERY.value
    config.checkpoint_every = 10**9
    if "image_grid_every" in config:
        config.image_grid_every = 0
    if "eval" in config and "every_steps" in config.eval:
        config.eval.every_steps = 0
    steps = _LOOP_STEPS.value
    with tempfile.TemporaryDirectory(prefix="train_step_loop_") as workdir:
        try:
            loop.run(config, workdir, stop_after_step=steps)
        except FileNotFoundError as e:  # dataset not prepared
            print(f"loop: skipped ({e})".splitlines()[0], flush=True)
            return {"loop_note": f"skipped: {e}"}
        with open(Path(workdir) / "metrics.jsonl") as f:
            rows = [json.loads(line) for line in f]
    timed = [r["steps_per_sec"] for r in rows if "steps_per_sec" in r][1:]
    if not timed:
        return {"loop_note": f"no logged interval after the first in {steps} steps: "
                             "raise --loop_steps"}
    loop_rate = float(np.median(timed))
    return {"loop_steps": steps, "loop_log_every": config.log_every,
            "loop_intervals_steps_per_s": [round(r, 3) for r in timed],
            "loop_steps_per_s": loop_rate,
            "loop_images_per_s": loop_rate * bench.global_batch}


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(x) >= scale:
            return f"{x / scale:.1f} {prefix}{unit}"
    return f"{x:.1f} {unit}"


def print_block(bench: Bench, r: dict) -> None:
    gib = profiling.GIB
    h, w = r["image_hw"]
    accum = r["grad_accum_steps"]
    lines = [
        f"=== stage {STAGE_NUMBER[r['stage']]} {r['stage']}: {r['config']} ===",
        f"model: {bench.description()}; input {h}x{w}x3 uint8",
        f"devices: {r['num_devices']} x {r['device_kind']} ({r['platform']}); dtype "
        f"{r['dtype']} (params float32); state {r['param_sharding']}",
        f"batch: {r['batch_per_device']} per device x {r['num_devices']} = "
        f"{r['global_batch']} global" + (f"; grad accumulation {accum} steps"
                                         if accum and accum > 1 else ""),
        f"params: {r['params_trainable'] / 1e6:.2f}M trainable / "
        f"{r['params_total'] / 1e6:.2f}M total",
        "XLA cost: " + profiling.describe({"flops_per_step": r["flops_per_step"],
                                           "flops_per_example": r["flops_per_example"],
                                           "memory": r["memory_per_device"]})
        + (f" (XLA's heap-simulated peak {r['memory_per_device']['xla_peak'] / gib:.2f}"
           " GiB)" if (r["memory_per_device"] or {}).get("xla_peak") else ""),
        "device memory limit: " + (f"{r['device_memory_limit'] / gib:.2f} GiB"
                                   if r["device_memory_limit"] else
                                   "not reported by this backend"),
        f"compile: {r['compile_s']:.1f} s",
    ]
    if "max_batch_per_device" in r:
        lines.append("max per-device batch that fits: " + (
            str(r["max_batch_per_device"]) if r["max_batch_per_device"] is not None
            else r["max_batch_note"]))
    if "step_s_median" in r:
        lines += [
            f"step: median {r['step_s_median']:.3f} s over {r['steps']} steps (min "
            f"{r['step_s_min']:.3f}, max {r['step_s_max']:.3f}; {r['warmup']} warm-up)",
            f"throughput: {r['images_per_s']:.2f} images/s",
            f"achieved: {_si(r['achieved_flops_per_s_per_device'], 'FLOP/s')} per device",
            f"MFU vs measured {r['dtype']} matmul peak ({r['matmul_n']}^3, best of "
            f"{_MATMUL_REPS.value}: {_si(r['matmul_peak_flops_per_s'], 'FLOP/s')}): "
            f"{r['mfu_matmul']:.1%}",
            "MFU vs nominal peak: " + (
                f"{r['mfu_nominal']:.1%} of {_si(r['nominal_peak_flops_per_s'], 'FLOP/s')}"
                f" ({r['nominal_peak']})" if r["mfu_nominal"] is not None
                else r["nominal_peak"]),
        ]
    if r.get("loss") is not None:
        lines.append(f"loss after the timed steps: {r['loss']:.4f}")
    if "loop_vs_bare" in r:
        lines.append(
            f"training loop (real data, {r['loop_steps']} steps, log every "
            f"{r['loop_log_every']}): {r['loop_steps_per_s']:.3f} steps/s "
            f"({r['loop_images_per_s']:.2f} images/s) vs bare step "
            f"{1.0 / r['step_s_median']:.3f} steps/s: loop/bare {r['loop_vs_bare']:.1%}")
    elif "loop_note" in r:
        lines.append(f"training loop: {r['loop_note']}")
    if "profile" in r:
        prof = r["profile"]
        ops = prof["ops"]
        lines.append(
            f"profile ({prof['steps']} steps, {prof['step_s']:.3f} s/step traced, in "
            f"{prof['dir']}): XLA op time per step, by kind, "
            f"{sum(o['ms_per_step'] for o in ops):.1f} ms in all (thread time of "
            "the ops' own threads: op-parallel ops overlap, intra-op work on "
            "other threads is not counted)")
        lines += [f"  {o['ms_per_step']:8.1f} ms {o['share']:6.1%} "
                  f"{o['ops_per_step']:6.0f}/step  {o['kind']}"
                  for o in ops[:_PROFILE_TOP.value]]
    print("\n".join(lines))
    print("RESULT " + json.dumps(_rounded(r), sort_keys=False), flush=True)


def _rounded(x):
    if isinstance(x, float):
        return float(f"{x:.4g}") if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


def main(argv):
    del argv
    stages = [s.strip() for s in _STAGES.value if s.strip()]
    for s in stages:
        if s not in STAGES:
            raise app.UsageError(f"--stages: {s!r} is not one of {STAGES}.")
    if _DEVICES.value > jax.device_count():
        raise app.UsageError(f"--devices={_DEVICES.value}: only "
                             f"{jax.device_count()} devices.")
    if _LOOP_STEPS.value and _RECIPE.value != "cpu":
        raise app.UsageError("--loop_steps needs --recipe=cpu (the paper datasets "
                             "are not at hand on a CPU machine).")
    overrides = parse_batch_overrides(_BATCH.value)
    decoder_widths()  # a malformed --decoder_widths fails before compiling
    mesh = make_mesh(_DEVICES.value)
    for name in stages:
        run_stage(name, per_device_batch(name, overrides), mesh)


if __name__ == "__main__":
    app.run(main)
