"""Training-step benchmark of FLIP against OpenCLIP's patch-dropout CLIP: the measuring code.

For one architecture of ``conf/model/`` and several mask ratios it measures, for our
model and for the same architecture built with open-clip-torch:

- FLOPs per sample of the image and text forward passes and of a training step
  (forward + backward), counted with ``torch.utils.flop_counter.FlopCounterMode``
  under the math attention kernel (the counter does not see the fused CPU kernel),
  next to the analytic count of :func:`analytic_flops`;
- training-step time (forward + backward + AdamW), wall clock and process CPU time,
  over interleaved repeats after warm-up: median, min and max;
- the peak memory a step adds: CUDA max allocated, or resident-set growth on CPU, each
  (implementation, ratio) in a fresh process of this script (a process's heap keeps the
  pages of its largest step, which would hide what a smaller step needs).

The optimiser is each project's shipped AdamW (``adamw="shipped"``): ours as
``PretrainModule.configure_optimizers`` builds it, OpenCLIP's as ``open_clip_train/main.py``
does; or, like for like, the same implementation and values for both.

``experiments/benchmark.py`` is the command line; :func:`to_markdown` renders the table.
This is tooling beside the library (it imports open-clip-torch), not part of ``flip``.
"""

import ctypes
import json
import math
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from importlib.resources import files

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flip.loss import contrastive_loss
from flip.masking import Mask, num_visible
from flip.tasks.pretrain import PretrainModule

MODEL_CONF = files("flip.conf") / "model"  # conf/model, installed with the package
IMPLS = ("flip", "openclip")
# each project's shipped AdamW, or one implementation for both (FLIP's values)
ADAMW = ("shipped", "fused", "foreach", "for_loop")
# FLIP Table 1a (ViT-L/16, image + text): FLOPs and wall-clock time relative to mask 0.
PAPER_FLOPS = {0.0: 1.00, 0.5: 0.52, 0.75: 0.28}
PAPER_TIME = {0.0: 1.00, 0.5: 0.50, 0.75: 0.33}
PAPER_TEXT_SHARE = 0.044  # text encoder FLOPs / image encoder FLOPs, ViT-L/16
MEMORY_GOAL = 0.35  # step memory at mask 0.75 / mask 0 (activations scale with tokens)


def model_config(arch: str, image_size: int) -> dict:
    """``conf/model/<arch>.yaml`` resolved at ``image_size`` (mask ratio 0)."""
    root = OmegaConf.create(
        {
            "data": {"image_size": image_size},
            "mask": 0.0,
            "model": OmegaConf.create((MODEL_CONF / f"{arch}.yaml").read_text()),
        }
    )
    return OmegaConf.to_container(root.model, resolve=True)


# ------------------------------------------------------------------------------ FLOPs


def block_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> int:
    """Forward FLOPs of one pre-norm Transformer block on ``tokens`` tokens of one sample.

    Multiply-adds per token: qkv 3D², output projection D², MLP 2·(mlp_ratio·D)·D; the
    attention matmuls QKᵀ and AV are L²·D each. Two FLOPs per multiply-add; norms,
    softmax, GELU and residual adds are not counted (nor by FlopCounterMode).
    """
    hidden = int(width * mlp_ratio)
    return 2 * tokens * (4 * width * width + 2 * width * hidden) + 4 * tokens * tokens * width


def analytic_flops(cfg: dict, ratio: float, batch: int) -> dict[str, int]:
    """FLOPs per sample of our model (``cfg`` from :func:`model_config`) at mask ``ratio``.

    image/text: encoder forward incl. the patch embedding and the bias-free projection;
    forward: both plus the two (b, B) logit matmuls of the loss; train: forward and
    backward, where backward costs twice the forward except for the patch embedding,
    which needs no gradient with respect to the pixels.
    """
    im, tx, embed = cfg["image"], cfg["text"], cfg["embed_dim"]
    patches = (im["image_size"] // im["patch_size"]) ** 2
    tokens = num_visible(patches, ratio) + int(im.get("class_token", True))
    patch_embed = 2 * patches * im["width"] * 3 * im["patch_size"] ** 2
    image = (
        patch_embed
        + 2 * im["width"] * embed
        + im["depth"] * block_flops(tokens, im["width"], im.get("mlp_ratio", 4.0))
    )
    text = 2 * tx["width"] * embed + tx["depth"] * block_flops(
        tx["context_length"], tx["width"], tx.get("mlp_ratio", 4.0)
    )
    forward = image + text + 2 * 2 * batch * embed
    return {"image": image, "text": text, "forward": forward, "train": 3 * forward - patch_embed}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs counted while running ``fn``, with attention on the (countable) math kernel."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- models


@dataclass
class Trainee:
    """A model, its loss and its optimiser, driven the same way for both implementations."""

    name: str
    model: nn.Module
    set_mask: Callable[[float], None]  # the image mask ratio of the next passes
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images, tokens) -> loss
    encode_image: Callable[[torch.Tensor], torch.Tensor]  # under the set mask
    optimizer: torch.optim.Optimizer
    after_step: Callable[[], None] = lambda: None

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def adamw(
    model: nn.Module, no_decay: Callable[[str, torch.Tensor], bool], impl: str, lr: float = 1e-4
) -> torch.optim.AdamW:
    """AdamW with FLIP's values; ``impl``: ``fused``, ``foreach`` or ``for_loop``."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (rest if no_decay(name, p) else decay).append(p)
    kind = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.2}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        **kind[impl],
    )


def flip_shipped_adamw(model: nn.Module) -> torch.optim.AdamW:
    """Our AdamW as pre-training builds it (``conf/task/pretrain.yaml`` defaults): the
    learning rate does not change what a step costs."""
    module = PretrainModule(model, global_batch=256, total_samples=10**9, warmup_samples=0)
    return module.configure_optimizers()["optimizer"]


# open_clip_train/main.py's rule: no weight decay on gains and biases (its ``exclude``)
def openclip_no_decay(n: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n


def openclip_shipped_adamw(model: nn.Module) -> torch.optim.AdamW:
    """AdamW as ``open_clip_train/main.py`` builds it for a ViT with its default arguments
    (``open_clip_train.params``: lr 5e-4, betas (0.9, 0.98), eps 1e-6, wd 0.2): gains and
    biases first without decay, torch's default implementation (a loop of ops per tensor
    on CPU, foreach on CUDA)."""
    from open_clip_train.params import parse_args

    args = parse_args(["--model", "ViT-B-16"])  # only "vit" in the name picks the values
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for n, p in named if openclip_no_decay(n, p)], "weight_decay": 0.0},
            {
                "params": [p for n, p in named if not openclip_no_decay(n, p)],
                "weight_decay": args.wd,
            },
        ],
        lr=args.lr,
        betas=(args.beta1, args.beta2),
        eps=args.eps,
    )


def build_flip(cfg: dict, adamw_impl: str) -> Trainee:
    """Our model stepped as training steps it: the official no-decay set, the logit scale
    clipped after every step."""
    model = instantiate(cfg)
    no_decay = model.no_weight_decay()
    mask = [Mask()]  # as training passes it: an argument of the forward

    def set_mask(ratio: float) -> None:
        mask[0] = Mask(ratio)

    def loss(images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(*model(images, tokens, mask[0]))

    def encode_image(images: torch.Tensor) -> torch.Tensor:
        return model.encode_image(images, mask[0])

    opt = (
        flip_shipped_adamw(model)
        if adamw_impl == "shipped"
        else adamw(model, lambda n, p: n in no_decay, adamw_impl)
    )
    return Trainee("flip", model, set_mask, loss, encode_image, opt, model.clamp_logit_scale_)


def openclip_config(cfg: dict) -> dict:
    """OpenCLIP ``CLIP`` keyword arguments mirroring our architecture ``cfg``.

    Same widths, depths, heads, patch, embedding size, fixed 2-D sin-cos position
    embedding, no ln_pre, average pooling (OpenCLIP averages the patch tokens only; its
    class token is always present), non-causal text with first-token pooling over the
    BERT vocabulary. Its patch embedding has no bias; ours has one.
    """
    im, tx = cfg["image"], cfg["text"]
    vision = dict(
        image_size=im["image_size"],
        patch_size=im["patch_size"],
        width=im["width"],
        layers=im["depth"],
        head_width=im["width"] // im["heads"],
        mlp_ratio=im.get("mlp_ratio", 4.0),
        no_ln_pre=True,
        pos_embed_type="sin_cos_2d",
        pool_type="avg",
    )
    text = dict(
        context_length=tx["context_length"],
        vocab_size=tx.get("vocab_size", 30522),
        width=tx["width"],
        heads=tx["heads"],
        layers=tx["depth"],
        mlp_ratio=tx.get("mlp_ratio", 4.0),
        no_causal_mask=True,
        pool_type="first",
    )
    return dict(embed_dim=cfg["embed_dim"], vision_cfg=vision, text_cfg=text)


def build_openclip(cfg: dict, adamw_impl: str) -> Trainee:
    import open_clip
    from open_clip.transformer import PatchDropout

    model = open_clip.model.CLIP(**openclip_config(cfg))
    clip_loss = open_clip.ClipLoss()

    def set_mask(ratio: float) -> None:  # OpenCLIP's own construction of patch_dropout
        model.visual.patch_dropout = PatchDropout(ratio) if ratio > 0 else nn.Identity()

    def loss(images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return clip_loss(*model(images, tokens))

    def after_step() -> None:  # as open_clip_train does after every step
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    opt = (
        openclip_shipped_adamw(model)
        if adamw_impl == "shipped"
        else adamw(model, openclip_no_decay, adamw_impl)
    )
    return Trainee("openclip", model, set_mask, loss, model.encode_image, opt, after_step)


BUILDERS = {"flip": build_flip, "openclip": build_openclip}


def measured_flops(
    cfg: dict, impl: str, ratios: tuple[float, ...], batch: int, device: str = "meta"
) -> dict[float, dict[str, float]]:
    """FLOPs per sample counted on implementation ``impl`` at each mask ratio.

    image/text: ``encode_image``/``encode_text``; forward: model and loss; train:
    model, loss and backward (AdamW counts no FLOPs). The model runs on the meta device
    by default: the counter reads shapes only, so counts equal those of a real run
    (a test checks it on the CPU) and a large model costs no arithmetic.
    """
    with torch.device(device):
        t = BUILDERS[impl](cfg, "for_loop")
        t.model.train()
        size, ctx = cfg["image"]["image_size"], cfg["text"]["context_length"]
        images = torch.randn(batch, 3, size, size)
        tokens = torch.randint(1, cfg["text"].get("vocab_size", 30522), (batch, ctx))
        out = {}
        for r in ratios:
            t.set_mask(r)
            with torch.no_grad():
                image = count_flops(lambda: t.encode_image(images))
                text = count_flops(lambda: t.encode_text(tokens))
                forward = count_flops(lambda: t.loss(images, tokens))
            train = count_flops(lambda: t.loss(images, tokens).backward())
            t.optimizer.zero_grad(set_to_none=True)
            out[r] = {
                "image": image / batch,
                "text": text / batch,
                "forward": forward / batch,
                "train": train / batch,
            }
    return out


# -------------------------------------------------------------------------- measuring


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(
    dtype: str, device: torch.device, size: int = 2048, repeats: int = 5
) -> dict[str, float]:
    """The machine's own matmul rate: ``torch.mm`` of two ``size``² matrices of ``dtype`` at
    the current thread count, FLOP/s of the fastest of ``repeats`` (after one warm-up), by
    process CPU time on the CPU (what the single-threaded step is timed by; other jobs on
    the machine do not count) and by wall clock on CUDA."""
    a, b = (torch.randn(size, size, device=device, dtype=DTYPES[dtype]) for _ in range(2))
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    best = math.inf
    for i in range(repeats + 1):
        _sync(device)
        t0 = clock()
        torch.mm(a, b)
        _sync(device)
        if i:
            best = min(best, clock() - t0)
    return {"flops_per_s": 2 * size**3 / best, "size": size, "seconds": best}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_memory() -> None:
    """Return freed heap pages to the OS so resident-set growth measures the next step."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes by which ``fn`` raises memory above its starting point at its peak.

    CUDA: max allocated minus allocated before. CPU (Linux): peak resident set, sampled
    every millisecond by a thread, minus the resident set before (after malloc_trim).
    None where neither is available.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not os.path.exists("/proc/self/statm"):
        return None
    _release_free_memory()
    before = peak = _rss()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.001):
            peak = max(peak, _rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    fn()
    peak = max(peak, _rss())
    done.set()
    sampler.join()
    return peak - before


@dataclass
class Settings:
    arch: str = "tiny"
    image_size: int | None = None  # None: 64 for tiny (its data), 224 otherwise
    batch: int = 32
    ratios: tuple[float, ...] = (0.0, 0.5, 0.75)
    impls: tuple[str, ...] = IMPLS
    device: str = "cpu"
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    threads: int | None = None  # torch intra-op threads; None: torch's default
    warmup: int = 1  # untimed steps per (implementation, ratio)
    repeats: int = 3  # timed steps per (implementation, ratio), interleaved
    attention: str = "fused"  # fused: scaled_dot_product_attention's best kernel | math
    adamw: str = "shipped"  # one of ADAMW
    # the memory processes run after the timed steps, or beside them: sooner where a core
    # is free for them (they add their load to the timed process's machine)
    memory: str = "after"
    compile: bool = False  # torch.compile the forward + loss with static shapes
    channels_last: bool | None = None  # None: on for CUDA
    profile: float | None = None  # also record the top ops of one step at this ratio
    flops_only: bool = False  # count FLOPs (on the meta device) and skip timing and memory
    seed: int = 0

    def resolved_image_size(self) -> int:
        return self.image_size or (64 if self.arch == "tiny" else 224)


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def top_ops(fn: Callable[[], object], device: torch.device, rows: int = 15) -> list[dict]:
    """The ``rows`` ops of ``fn`` with the most self time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1
    return [
        {
            "op": e.key,
            "self_ms": getattr(e, attr) / 1e3,
            "share": getattr(e, attr) / total,
            "calls": e.count,
        }
        for e in events[:rows]
    ]


def run_benchmark(s: Settings, log: Callable[[str], None] = lambda msg: None) -> dict:
    """Measure every (implementation, ratio) of ``s``; returns ``{"meta", "rows", "profile"}``."""
    if s.dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be fp32 or bf16, got {s.dtype!r}")
    if s.attention not in ("fused", "math"):
        raise ValueError(f"attention must be fused or math, got {s.attention!r}")
    if s.adamw not in ADAMW:
        raise ValueError(f"adamw must be one of {', '.join(ADAMW)}, got {s.adamw!r}")
    if s.memory not in ("after", "beside"):
        raise ValueError(f"memory must be after or beside, got {s.memory!r}")
    load_start = os.getloadavg()
    device = torch.device(s.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    cfg = model_config(s.arch, s.resolved_image_size())
    flops = {}
    for name in s.impls:
        for r, f in measured_flops(cfg, name, s.ratios, s.batch).items():
            flops[name, r] = f
            log(f"{name} mask {r}: {f['train'] / 1e9:.2f} GFLOPs/sample per training step")
    steps = None
    if not s.flops_only and s.memory == "beside":  # the children run while this times
        with ThreadPoolExecutor(1) as pool:
            memory = pool.submit(memory_in_fresh_processes, s, log)
            steps = time_steps(s, cfg, device, log)
            steps["memory"] = memory.result()
    elif not s.flops_only:
        steps = time_steps(s, cfg, device, log)
        steps["memory"] = memory_in_fresh_processes(s, log)
    meta = {
        "settings": {
            **s.__dict__,
            "image_size": cfg["image"]["image_size"],
            "channels_last": _channels_last(s, device),
            "ratios": list(s.ratios),
            "impls": list(s.impls),
        },
        "threads": torch.get_num_threads(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {_cpu_name()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "python": platform.python_version(),
    }
    try:
        import open_clip

        meta["open_clip"] = open_clip.__version__
    except ImportError:
        pass
    return {
        "meta": meta,
        "rows": _rows(s, cfg, flops, steps),
        "profile": steps["profile"] if steps else {},
    }


def _channels_last(s: Settings, device: torch.device) -> bool:
    return device.type == "cuda" if s.channels_last is None else s.channels_last


def trainees_and_step(
    s: Settings, cfg: dict, device: torch.device, impls: tuple[str, ...]
) -> tuple[dict[str, Trainee], Callable[[str], None]]:
    """The trainees of ``impls`` on ``device`` and ``step(name)``, one training step of one
    of them on a fixed random batch."""
    channels_last = _channels_last(s, device)

    def autocast():
        bf16 = s.dtype == "bf16"
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def attention():
        return sdpa_kernel(SDPBackend.MATH) if s.attention == "math" else nullcontext()

    trainees = {}
    for name in impls:
        t = BUILDERS[name](cfg, s.adamw)
        t.model.to(device).train()
        if channels_last:
            t.model.to(memory_format=torch.channels_last)
        trainees[name] = t
    g = torch.Generator().manual_seed(s.seed)
    size = cfg["image"]["image_size"]
    images = torch.randn(s.batch, 3, size, size, generator=g).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    tokens = torch.randint(
        1,
        cfg["text"].get("vocab_size", 30522),
        (s.batch, cfg["text"]["context_length"]),
        generator=g,
    ).to(device)
    losses = {
        name: (torch.compile(t.loss, dynamic=False) if s.compile else t.loss)
        for name, t in trainees.items()
    }

    def step(name: str) -> None:
        t = trainees[name]
        with autocast(), attention():
            loss = losses[name](images, tokens)
        with attention():
            loss.backward()
        t.optimizer.step()
        t.after_step()
        t.optimizer.zero_grad(set_to_none=True)

    return trainees, step


def time_steps(
    s: Settings, cfg: dict, device: torch.device, log: Callable[[str], None]
) -> dict[str, dict]:
    """Time training steps of every (implementation, ratio), interleaved, then profile one
    step per implementation.

    Returns ``{"wall", "cpu"}`` keyed by (implementation, ratio) and ``"profile"`` keyed
    by implementation.
    """
    trainees, step = trainees_and_step(s, cfg, device, s.impls)
    wall = {(name, r): [] for name in s.impls for r in s.ratios}
    cpu = {k: [] for k in wall}
    for rep in range(s.warmup + s.repeats):
        order = list(s.impls) if rep % 2 == 0 else list(reversed(s.impls))
        for r in s.ratios:
            for name in order:
                trainees[name].set_mask(r)
                _sync(device)
                w0, c0 = time.perf_counter(), time.process_time()
                step(name)
                _sync(device)
                w, c = time.perf_counter() - w0, time.process_time() - c0
                if rep >= s.warmup:
                    wall[name, r].append(w)
                    cpu[name, r].append(c)
                log(
                    f"{'warm-up' if rep < s.warmup else f'repeat {rep - s.warmup + 1}'} "
                    f"{name} mask {r}: {w:.3f} s wall, {c:.3f} s CPU"
                )

    profile = {}
    if s.profile is not None:
        for name, t in trainees.items():
            t.set_mask(s.profile)
            step(name)  # warm at this ratio
            profile[name] = top_ops(lambda name=name: step(name), device)

    return {"wall": wall, "cpu": cpu, "profile": profile}


def memory_in_fresh_processes(
    s: Settings, log: Callable[[str], None] = lambda msg: None
) -> dict[tuple[str, float], dict]:
    """:func:`step_memory` of every (implementation, ratio), each in a fresh process of
    this script: in one process, a step at mask 0.75 after one at mask 0 reuses the heap
    pages that step left resident, and its resident-set growth would read too low."""
    from benchmark_grad_cache import run_variants  # experiments/benchmark_grad_cache.py

    variants = [f"{name}/{r}" for name in s.impls for r in s.ratios]
    runs = run_variants(__file__, ["--settings", json.dumps(asdict(s))], variants, rounds=1)
    out = {}
    for name in s.impls:
        for r in s.ratios:
            out[name, r] = runs[f"{name}/{r}"][0]
            log(
                f"{name} mask {r}: a step adds {_mb(out[name, r]['step_peak'])} MB "
                f"(own process, peak resident {_mb(out[name, r]['process_peak'])} MB)"
            )
    return out


def _mb(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.0f}"


def step_memory(s: Settings, name: str, ratio: float) -> dict[str, int | None]:
    """In this process: build implementation ``name`` alone, take ``s.warmup`` steps (at
    least one: AdamW's state exists then, as in training), and measure the next step's
    peak memory (:func:`peak_memory`: activations, gradients, temporaries). Also the
    process's peak resident set (CPU) or peak allocated (CUDA) since it started."""
    device = torch.device(s.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    cfg = model_config(s.arch, s.resolved_image_size())
    trainees, step = trainees_and_step(s, cfg, device, (name,))
    trainees[name].set_mask(ratio)
    for _ in range(max(1, s.warmup)):
        step(name)
    peak = peak_memory(lambda: step(name), device)
    if device.type == "cuda":
        process_peak = torch.cuda.max_memory_allocated(device)
    else:
        process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB
    return {"step_peak": peak, "process_peak": process_peak}


def _rows(s: Settings, cfg: dict, flops: dict, steps: dict | None) -> list[dict]:
    """One result row per (implementation, ratio); the timing and memory fields are None
    without ``steps``. Ratios are to the first mask ratio, speed-ups ours over OpenCLIP's.
    The visible-token ratio is the image tower's sequence length (visible patches and the
    class token) over the first ratio's: what its activations scale with."""
    base, rows = s.ratios[0], []
    patches = (cfg["image"]["image_size"] // cfg["image"]["patch_size"]) ** 2
    cls = int(cfg["image"].get("class_token", True))
    for name in s.impls:
        for r in s.ratios:
            f, f0 = flops[name, r], flops[name, base]
            a, a0 = analytic_flops(cfg, r, s.batch), analytic_flops(cfg, base, s.batch)
            row = {
                "impl": name,
                "mask": r,
                "visible_patches": num_visible(patches, r),
                "flops": f,
                "analytic_flops": a,
                "flops_ratio": f["train"] / f0["train"],
                "analytic_ratio": a["train"] / a0["train"],
                "text_share": f0["text"] / f0["image"],
                "visible_token_ratio": (
                    (num_visible(patches, r) + cls) / (num_visible(patches, base) + cls)
                ),
                "wall_s": None,
                "cpu_s": None,
                "samples_per_s": None,
                "time_ratio": None,
                "cpu_time_ratio": None,
                "peak_mb": None,
                "peak_mb_per_sample": None,
                "memory_ratio": None,
                "process_peak_mb": None,
            }
            if steps:
                wall = {k: _stats(v) for k, v in steps["wall"].items()}
                cpu = {k: _stats(v) for k, v in steps["cpu"].items()}
                w, c = wall[name, r], cpu[name, r]
                mem, mem0 = (steps["memory"][name, x]["step_peak"] for x in (r, base))
                row.update(
                    {
                        "wall_s": w,
                        "cpu_s": c,
                        "samples_per_s": s.batch / w["median"],
                        "time_ratio": w["median"] / wall[name, base]["median"],
                        "cpu_time_ratio": c["median"] / cpu[name, base]["median"],
                        "peak_mb": None if mem is None else mem / 2**20,
                        "peak_mb_per_sample": None if mem is None else mem / 2**20 / s.batch,
                        "memory_ratio": None if mem is None else mem / mem0,
                        "process_peak_mb": steps["memory"][name, r]["process_peak"] / 2**20,
                    }
                )
                if name == "flip" and "openclip" in s.impls:
                    row["speedup_vs_openclip"] = wall["openclip", r]["median"] / w["median"]
                    row["cpu_speedup_vs_openclip"] = cpu["openclip", r]["median"] / c["median"]
            rows.append(row)
    return rows


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# ---------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _range(st: dict | None) -> str:
    return "–" if st is None else f"{st['median']:.3f} [{st['min']:.3f}–{st['max']:.3f}]"


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def to_markdown(result: dict) -> str:
    """The measured table, the performance goals and the profiles as markdown."""
    meta, rows = result["meta"], result["rows"]
    st = meta["settings"]
    timing = (
        "FLOPs only (counted on the meta device)"
        if st.get("flops_only")
        else f"{st['warmup']} warm-up and {st['repeats']} timed steps per row, interleaved; "
        "times are median [min–max]; peak memory of one step after warm-up, each row "
        "in its own process"
    )
    adamw = (
        "each project's shipped AdamW (ours: PretrainModule's, fused; OpenCLIP: "
        "open_clip_train's, torch's default implementation)"
        if st["adamw"] == "shipped"
        else f"AdamW {st['adamw']} with FLIP's values for both"
    )
    load = ""
    if "loadavg_start" in meta:
        load = (
            f"; load average (1/5/15 min) "
            f"{'/'.join(f'{x:.2f}' for x in meta['loadavg_start'])} at start, "
            f"{'/'.join(f'{x:.2f}' for x in meta['loadavg_end'])} at end"
        )
    out = [
        f"{st['arch']}, {st['image_size']} px, micro-batch {st['batch']}, {st['dtype']}, "
        f"{st['device']} ({meta['machine']}), {meta['threads']} threads, attention "
        f"{st['attention']}, {adamw}, compile {st['compile']}, torch "
        f"{meta['torch']}, open_clip {meta.get('open_clip', '-')}{load}; {timing}.",
        "",
        "| impl | mask | visible patches | GFLOPs/sample image fwd | text fwd | train step "
        "| FLOPs ratio (analytic) | step s wall | step s CPU | samples/s | time ratio wall "
        "(CPU) | peak MB/sample | memory ratio (image tokens) | vs OpenCLIP wall (CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["flops"]
        vs = (
            f"{r['speedup_vs_openclip']:.2f}× ({r['cpu_speedup_vs_openclip']:.2f}×)"
            if "speedup_vs_openclip" in r
            else ""
        )
        out.append(
            f"| {r['impl']} | {r['mask']:g} | {r['visible_patches']} | {f['image'] / 1e9:.3f} "
            f"| {f['text'] / 1e9:.3f} | {f['train'] / 1e9:.3f} | {r['flops_ratio']:.3f} "
            f"({r['analytic_ratio']:.3f}) | {_range(r['wall_s'])} | {_range(r['cpu_s'])} "
            f"| {_fmt(r['samples_per_s'], '.2f')} | {_fmt(r['time_ratio'])} "
            f"({_fmt(r['cpu_time_ratio'])}) | {_fmt(r['peak_mb_per_sample'], '.1f')} "
            f"| {_fmt(r['memory_ratio'])} ({r['visible_token_ratio']:.3f}) | {vs} |"
        )
    out += ["", *goals(result)]
    for name, ops in result.get("profile", {}).items():
        out += [
            "",
            f"Top ops of one {name} step at mask {st['profile']:g} (torch.profiler, self time):",
            "",
            "| op | self ms | share | calls |",
            "|---|---|---|---|",
        ]
        out += [
            f"| `{o['op']}` | {o['self_ms']:.1f} | {o['share']:.1%} | {o['calls']} |" for o in ops
        ]
    return "\n".join(out)


def goals(result: dict) -> list[str]:
    """The performance goals checked on our rows, one markdown bullet each: FLOPs ratios within
    0.01 of the analytic ones, step-time ratios at most 1.05 × the FLOPs ratios, memory at
    mask 0.75 at most 0.35 × mask 0's, and throughput at least 1.1 × OpenCLIP's."""
    ours = [r for r in result["rows"] if r["impl"] == "flip"]
    if not ours:
        return []
    from_zero = ours[0]["mask"] == 0.0  # the paper's ratios and the text share are to mask 0
    lines = (
        [
            f"- text encoder FLOPs = {ours[0]['text_share']:.1%} of the image encoder's "
            f"(paper, L/16: {PAPER_TEXT_SHARE:.1%})"
        ]
        if from_zero
        else []
    )
    for r in ours[1:]:
        d = r["flops_ratio"] - r["analytic_ratio"]
        line = (
            f"- mask {r['mask']:g}: FLOPs ratio {r['flops_ratio']:.3f} vs analytic "
            f"{r['analytic_ratio']:.3f} (diff {d:+.4f}: {_met(abs(d) <= 0.01)})"
        )
        if r["mask"] in PAPER_FLOPS and from_zero:
            line += f", paper {PAPER_FLOPS[r['mask']]:.2f}"
        if r["time_ratio"] is not None:
            limit = 1.05 * r["flops_ratio"]
            line += (
                f"; time ratio {r['time_ratio']:.3f} wall / {r['cpu_time_ratio']:.3f} CPU "
                f"vs limit 1.05 × FLOPs = {limit:.3f} ({_met(r['time_ratio'] <= limit)} "
                f"wall, {_met(r['cpu_time_ratio'] <= limit)} CPU)"
            )
            if r["mask"] in PAPER_TIME and from_zero:
                line += f", paper {PAPER_TIME[r['mask']]:.2f}"
        if r["memory_ratio"] is not None:
            line += (
                f"; memory ratio {r['memory_ratio']:.3f} vs image tokens "
                f"{r['visible_token_ratio']:.3f}"
            )
            if r["mask"] == 0.75 and from_zero:
                line += f" (goal ≤ {MEMORY_GOAL:.2f}: {_met(r['memory_ratio'] <= MEMORY_GOAL)})"
        lines.append(line)
    for r in ours:
        if "speedup_vs_openclip" in r:
            lines.append(
                f"- mask {r['mask']:g}: throughput vs OpenCLIP {r['speedup_vs_openclip']:.2f}× "
                f"wall, {r['cpu_speedup_vs_openclip']:.2f}× CPU (goal ≥ 1.10×: "
                f"{_met(r['speedup_vs_openclip'] >= 1.1)} wall, "
                f"{_met(r['cpu_speedup_vs_openclip'] >= 1.1)} CPU)"
            )
    return lines


if __name__ == "__main__":  # a child of memory_in_fresh_processes: one variant's memory
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--settings", required=True, help="Settings as json")
    p.add_argument("--variant", required=True, help="<impl>/<mask ratio>")
    a = p.parse_args()
    fields = json.loads(a.settings)
    settings = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    impl, ratio = a.variant.split("/")
    print(json.dumps(step_memory(settings, impl, float(ratio))))
