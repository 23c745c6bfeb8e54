"""Convert the official FLIP checkpoints (JAX/Flax, written by t5x) into checkpoints of this
project.

The official repository (facebookresearch/flip, read at commit 9bf6bf8) releases ViT-L/16 and
ViT-H/14 trained on LAION-2B as t5x checkpoint folders: a msgpack file ``checkpoint`` holding
``{"version": 3, "optimizer": {"target": <parameters>, "state": <optimizer state>}}``, whose
leaves are either arrays (msgpack extension type 1, as ``flax.serialization`` writes them) or
TensorStore specs of zarr arrays stored beside it (``target.img_encoder.…`` folders, gzip
chunks; ``t5x/checkpoints.py``). Only ``target`` is read: the optimizer state is dropped.

Parameter names follow the official ``models_flip.py`` (t5x's ``DenseGeneral`` stores its
kernels flattened to 2-D: ``query/key/value`` (D, heads * head_dim), ``out`` (heads *
head_dim, D)):

    img_encoder/embedding/{kernel (p, p, 3, D), bias}      -> visual.patch_embed.proj
    img_encoder/cls (1, 1, D)                              -> visual.cls_token
    img_encoder/posembed_encoder/pos_embedding (1, 1+N, D) -> checked against our fixed table
    txt_encoder/token_embedding/embedding (V, D)           -> text.token_embed
    txt_encoder/posembed_encoder/pos_embedding (1, L, D)   -> text.pos_embed
    */Transformer/encoderblock_XX/LayerNorm_0, _1          -> blocks.X.norm1, norm2
    */…/MultiHeadDotProductAttention_0/{query,key,value}   -> blocks.X.attn.qkv (fused)
    */…/MultiHeadDotProductAttention_0/out                 -> blocks.X.attn.proj
    */…/MlpBlock_0/Dense_0, Dense_1                        -> blocks.X.mlp.fc1, fc2
    */Transformer/encoder_norm                             -> visual.norm / text.norm
    img_mlp1/kernel, txt_mlp1/kernel (no bias)             -> image_proj, text_proj
    logit_scale (1,)                                       -> logit_scale

Flax kernels are (in, out) and become torch's (out, in); the patch kernel (p, p, 3, D) becomes
(D, 3, p, p). Every official parameter is used exactly once, or the conversion stops naming
the ones left over. The image position embedding is fixed (sin-cos, ``stop_gradient``): it
is not loaded but compared with the model's own table (class-token row zero and unused).

The written checkpoint carries its model config: the official architecture with Flax's
LayerNorm epsilon (1e-6), the tanh GELU of ``flax.linen.gelu``, the official sin-cos channel
layout and the text vocabulary of 30523 rows (BERT's 30522 + tf_text's out-of-vocabulary
bucket, never produced by our tokenizer), so ``python eval.py ckpt_path=<out.ckpt>`` and
``python -m flip.interop.openclip export <out.ckpt> <dir>`` read it with no other argument.

Command line:
    python -m flip.interop.official convert <unzipped checkpoint dir> <out.ckpt> [--model vit_l16|vit_h14]
Needs ``msgpack`` and ``tensorstore`` (``pip install flip[official]``).
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch

from flip.checkpoint import save_flip_checkpoint
from flip.errors import CheckpointError


@dataclass(frozen=True)
class OfficialArch:
    """An architecture of the official configs (``configs/cfg_flip_*.py``)."""

    patch_size: int
    image_width: int
    image_depth: int
    image_heads: int
    text_width: int
    text_depth: int
    text_heads: int
    embed_dim: int  # clr.proj_dim_out


ARCHS = {  # configs/default.py (L/16), cfg_flip_base.py (B/16), cfg_flip_huge14.py (H/14)
    "vit_b16": OfficialArch(16, 768, 12, 12, 512, 12, 8, 512),
    "vit_l16": OfficialArch(16, 1024, 24, 16, 768, 12, 12, 768),
    "vit_h14": OfficialArch(14, 1280, 32, 16, 1024, 24, 16, 1024),
}
NORM_EPS = 1e-6  # t5x.layers.LayerNorm(epsilon=1e-6)
GELU = "tanh"  # flax.linen.gelu(approximate=True), models_flip.MlpBlock


# --- reading the t5x layout -------------------------------------------------------------


def find_checkpoint_file(path) -> Path:
    """The msgpack ``checkpoint`` file in ``path``: the file itself, ``path/checkpoint``, or
    the latest ``checkpoint_<step>/checkpoint`` within two levels (an unzipped release)."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "checkpoint").is_file():
        return path / "checkpoint"
    found = [
        p
        for pattern in ("checkpoint_*/checkpoint", "*/checkpoint_*/checkpoint", "*/checkpoint")
        for p in path.glob(pattern)
        if p.is_file()
    ]
    if not found:
        raise CheckpointError(
            f"{path} holds no t5x checkpoint (no file named 'checkpoint' "
            "in it or in a checkpoint_<step> folder below it)"
        )
    step = lambda p: (
        int(m.group(1)) if (m := re.search(r"checkpoint_(\d+)$", p.parent.name)) else -1
    )
    return max(found, key=step)


def _unpack_ext(code: int, data: bytes):
    """flax.serialization's msgpack extensions: 1 = ndarray, 3 = numpy scalar."""
    import msgpack

    if code not in (1, 3):
        return msgpack.ExtType(code, data)
    shape, dtype, buffer = msgpack.unpackb(data)
    return np.frombuffer(buffer, dtype=_dtype(dtype)).reshape(shape).copy()  # writable


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # installed with tensorstore

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _is_spec(leaf) -> bool:
    return isinstance(leaf, dict) and "driver" in leaf and "kvstore" in leaf


def _read_spec(spec: dict, ckpt_dir: Path) -> np.ndarray:
    """Read the zarr array a t5x TensorStore spec names, relative to the checkpoint folder
    (``file`` and ``gcs`` kvstores both mean the folder beside the msgpack file)."""
    import tensorstore as ts

    spec = dict(spec)
    kvstore = dict(spec["kvstore"])
    rel = spec.pop("path", None) or kvstore.get("path")
    spec["kvstore"] = {"driver": "file", "path": str(ckpt_dir / rel)}
    try:
        return ts.open(spec, open=True, read=True).result().read().result()
    except Exception as err:  # tensorstore raises ValueError with its own message
        raise CheckpointError(f"cannot read the array {ckpt_dir / rel}: {err}") from None


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not _is_spec(value):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def read_official_params(path) -> tuple[dict[str, np.ndarray], Path]:
    """The parameters (``target``) of a t5x checkpoint as float32 arrays keyed by their
    "/"-joined Flax names, and the msgpack file read; the optimizer state is not read."""
    import msgpack

    file = find_checkpoint_file(path)
    contents = msgpack.unpackb(
        file.read_bytes(), ext_hook=_unpack_ext, raw=False, strict_map_key=False
    )
    tree = contents.get("optimizer", contents) if isinstance(contents, dict) else None
    if not isinstance(tree, dict) or "target" not in tree:
        raise CheckpointError(f"{file} is not a t5x checkpoint (no optimizer/target tree)")
    params = {}
    for name, leaf in _flatten(tree["target"]).items():
        arr = _read_spec(leaf, file.parent) if _is_spec(leaf) else leaf
        if not isinstance(arr, np.ndarray):
            raise CheckpointError(
                f"{file}: parameter {name} is neither an array nor a "
                f"TensorStore spec ({type(arr).__name__})"
            )
        params[name] = np.asarray(arr, dtype=np.float32)
    return params, file


# --- the architecture --------------------------------------------------------------------


def _depth(params: dict, tower: str) -> int:
    blocks = {
        m.group(1)
        for n in params
        if (m := re.match(rf"{tower}/Transformer/encoderblock_(\d+)/", n))
    }
    return len(blocks)


def _shape(params: dict, name: str) -> tuple:
    if name not in params:
        raise CheckpointError(
            f"the official checkpoint lacks {name}: not a FLIP checkpoint (models_flip.py)"
        )
    return params[name].shape


def infer_arch(params: dict, name: str | None = None) -> tuple[str, OfficialArch]:
    """The entry of ``ARCHS`` whose shapes the parameters have (heads are not in the shapes,
    so the architecture must be a known one); ``name`` forces one and checks it."""
    kernel = _shape(params, "img_encoder/embedding/kernel")  # (p, p, 3, D)
    seen = dict(
        patch_size=kernel[0],
        image_width=kernel[-1],
        image_depth=_depth(params, "img_encoder"),
        text_width=_shape(params, "txt_encoder/token_embedding/embedding")[1],
        text_depth=_depth(params, "txt_encoder"),
        embed_dim=_shape(params, "img_mlp1/kernel")[1],
    )

    def matches(arch: OfficialArch) -> bool:
        return all(getattr(arch, k) == v for k, v in seen.items())

    if name is not None:
        if name not in ARCHS:
            raise CheckpointError(f"unknown model {name!r}; known: {', '.join(ARCHS)}")
        if not matches(ARCHS[name]):
            raise CheckpointError(f"the checkpoint is not {name}: it has {seen}")
        return name, ARCHS[name]
    found = [n for n, a in ARCHS.items() if matches(a)]
    if not found:
        raise CheckpointError(f"no known official architecture has these shapes: {seen}")
    return found[0], ARCHS[found[0]]


def flip_model_config(
    arch: OfficialArch,
    image_size: int = 224,
    context_length: int = 32,
    vocab_size: int = 30523,
    mlp_ratio: float = 4.0,
) -> dict:
    """This project's model config of an official architecture (official numerics)."""
    common = dict(
        mlp_ratio=mlp_ratio,
        grad_checkpointing=False,
        norm_eps=NORM_EPS,
        gelu_approximate=GELU,
    )
    return {
        "_target_": "flip.models.clip.FLIP",
        "embed_dim": arch.embed_dim,
        "image": {
            "_target_": "flip.models.image_encoder.ImageEncoder",
            "image_size": image_size,
            "patch_size": arch.patch_size,
            "width": arch.image_width,
            "depth": arch.image_depth,
            "heads": arch.image_heads,
            "class_token": True,
            "pool": "avg",
            "sincos_layout": "official",
            "drop_path": 0.0,
            **common,
        },
        "text": {
            "_target_": "flip.models.text_encoder.TextEncoder",
            "vocab_size": vocab_size,
            "context_length": context_length,
            "width": arch.text_width,
            "depth": arch.text_depth,
            "heads": arch.text_heads,
            "pool": "first",
            **common,
        },
    }


# --- the parameter map -------------------------------------------------------------------


class _Params:
    """The official parameters, each taken once."""

    def __init__(self, params: dict[str, np.ndarray]):
        self.left = dict(params)

    def take(self, name: str) -> torch.Tensor:
        if name not in self.left:
            raise CheckpointError(f"the official checkpoint lacks {name} (or it was used twice)")
        return torch.from_numpy(np.ascontiguousarray(self.left.pop(name)))


def _tower_state(p: _Params, src: str, dst: str, depth: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(depth):
        blk, ours = f"{src}/Transformer/encoderblock_{i:02d}", f"{dst}.blocks.{i}"
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
            out[f"{ours}.{norm}.weight"] = p.take(f"{blk}/{ln}/scale")
            out[f"{ours}.{norm}.bias"] = p.take(f"{blk}/{ln}/bias")
        attn = f"{blk}/MultiHeadDotProductAttention_0"
        qkv = [p.take(f"{attn}/{n}/kernel") for n in ("query", "key", "value")]
        # (D, heads*head_dim) each; torch's fused qkv rows are [q; k; v], head-major as Flax
        out[f"{ours}.attn.qkv.weight"] = torch.cat([k.reshape(k.shape[0], -1).T for k in qkv])
        out[f"{ours}.attn.qkv.bias"] = torch.cat(
            [p.take(f"{attn}/{n}/bias").reshape(-1) for n in ("query", "key", "value")]
        )
        proj = p.take(f"{attn}/out/kernel")  # (heads*head_dim, D)
        out[f"{ours}.attn.proj.weight"] = proj.reshape(-1, proj.shape[-1]).T
        out[f"{ours}.attn.proj.bias"] = p.take(f"{attn}/out/bias")
        for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            out[f"{ours}.mlp.{fc}.weight"] = p.take(f"{blk}/MlpBlock_0/{dense}/kernel").T
            out[f"{ours}.mlp.{fc}.bias"] = p.take(f"{blk}/MlpBlock_0/{dense}/bias")
    out[f"{dst}.norm.weight"] = p.take(f"{src}/Transformer/encoder_norm/scale")
    out[f"{dst}.norm.bias"] = p.take(f"{src}/Transformer/encoder_norm/bias")
    return out


def convert_params(params: dict[str, np.ndarray], model) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` (a FLIP of the matching config) from the official
    parameters; every official parameter used once, every model weight set, shapes checked."""
    p = _Params(params)
    pos = p.take("img_encoder/posembed_encoder/pos_embedding")[0]  # (1 + N, D), row 0 unused
    ours = model.visual.pos_embed[0]
    if (
        pos.shape != (1 + ours.shape[0], ours.shape[1])
        or not torch.allclose(pos[1:], ours, atol=1e-5)
        or pos[0].abs().max() > 0
    ):
        raise CheckpointError(
            "the official image position embedding is not the fixed 2-D "
            "sin-cos table of the converted model (layout 'official')"
        )
    state = {
        "visual.patch_embed.proj.weight": p.take("img_encoder/embedding/kernel").permute(
            3, 2, 0, 1
        ),
        "visual.patch_embed.proj.bias": p.take("img_encoder/embedding/bias"),
        "visual.cls_token": p.take("img_encoder/cls"),
        **_tower_state(p, "img_encoder", "visual", len(model.visual.blocks)),
        "text.token_embed.weight": p.take("txt_encoder/token_embedding/embedding"),
        "text.pos_embed": p.take("txt_encoder/posembed_encoder/pos_embedding"),
        **_tower_state(p, "txt_encoder", "text", len(model.text.blocks)),
        "image_proj.weight": p.take("img_mlp1/kernel").T,
        "text_proj.weight": p.take("txt_mlp1/kernel").T,
        "logit_scale": p.take("logit_scale").reshape(()),
    }
    if p.left:
        raise CheckpointError(
            f"{len(p.left)} official parameters have no place in the model "
            f"(not converted): {', '.join(sorted(p.left))}"
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"the conversion leaves model weights unset: {', '.join(missing)}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{name}: official shape {tuple(tensor.shape)} does not fit "
                f"the model's {tuple(expected[name].shape)}"
            )
    return {k: v.contiguous() for k, v in state.items()}  # load_state_dict copies them


def convert(src, out_ckpt, model: str | OfficialArch | None = None) -> Path:
    """Convert the t5x checkpoint at ``src`` into a FLIP checkpoint at ``out_ckpt`` (weights
    and model config). ``model``: a name of ``ARCHS`` (checked against the shapes), an
    ``OfficialArch``, or None (inferred from the shapes)."""
    params, file = read_official_params(src)
    arch = model if isinstance(model, OfficialArch) else infer_arch(params, model)[1]
    n_img = _shape(params, "img_encoder/posembed_encoder/pos_embedding")[1] - 1
    grid = math.isqrt(n_img)
    d_img = arch.image_width
    cfg = flip_model_config(
        arch,
        image_size=grid * arch.patch_size,
        context_length=_shape(params, "txt_encoder/posembed_encoder/pos_embedding")[1],
        vocab_size=_shape(params, "txt_encoder/token_embedding/embedding")[0],
        mlp_ratio=_shape(
            params, "img_encoder/Transformer/encoderblock_00/MlpBlock_0/Dense_0/kernel"
        )[1]
        / d_img,
    )
    flip = hydra.utils.instantiate(cfg)
    flip.load_state_dict(convert_params(params, flip))
    out = Path(out_ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_flip_checkpoint(out, flip.eval(), cfg)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flip.interop.official",
        description="Convert an official FLIP (JAX/t5x) checkpoint into a FLIP checkpoint of "
        "this project (weights + model config; optimizer state dropped).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="t5x checkpoint folder -> .ckpt")
    conv.add_argument("src", help="the unzipped release (or its checkpoint_<step> folder)")
    conv.add_argument("out", help="the FLIP checkpoint to write")
    conv.add_argument(
        "--model",
        choices=sorted(ARCHS),
        default=None,
        help="the architecture (default: recognised from the shapes)",
    )
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.out, args.model)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    except ModuleNotFoundError as err:
        raise SystemExit(
            f"error: {err.name} is needed to read t5x checkpoints: "
            "pip install 'flip[official]' (msgpack, tensorstore)"
        ) from None
    print(f"wrote {out}; evaluate with: python eval.py ckpt_path={out}")


if __name__ == "__main__":
    main()
