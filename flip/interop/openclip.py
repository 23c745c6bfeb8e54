"""Export a FLIP model to an OpenCLIP-loadable folder, and import one back.

``export_openclip(model, out_dir)`` writes ``open_clip_config.json`` (``model_cfg`` +
``preprocess_cfg``), ``open_clip_pytorch_model.bin`` (a state dict) and the tokenizer, which
stock open-clip-torch loads with ``open_clip.create_model("local-dir:<out_dir>")`` and
``open_clip.get_tokenizer("local-dir:<out_dir>")`` — no code of this repository needed.
The model config is CLIPA-like: non-causal text Transformer with first-token pooling, no
``ln_pre``, BERT WordPiece vocabulary (30522), context 32.

Exact equivalence (same embeddings up to float rounding) needs three rewrites, because
OpenCLIP's ViT differs from FLIP's in places its config cannot switch off:

- the patch convolution has no bias in OpenCLIP: the bias (a constant per token) is folded
  into the positional embedding; FLIP's class token has no position, so that row is 0;
- FLIP's fixed sin-cos position embedding becomes a (frozen-valued) learnable one;
- FLIP averages the final tokens *including* the class token (``pool="avg"``, the official
  model); OpenCLIP's ``avg`` excludes it. The export uses OpenCLIP's attentional pooler
  with one query, zero keys (so the attention is exactly uniform over all tokens), values
  = the image projection, and the FLIP LayerNorm as its ``ln_k``: its output is the
  un-normalised image embedding z. OpenCLIP then applies ``ln_post`` (a LayerNorm) and
  ``proj``; to make the LayerNorm a pure rescaling the embedding gets one extra component,
  ``-sum(z)``, so its mean is 0, and ``proj`` drops that component again. Embeddings are
  therefore ``embed_dim + 1`` wide with a last component 0 (text too); after L2
  normalisation they equal FLIP's, and so do all similarities.
  ``pool="token"`` maps directly to OpenCLIP's ``tok`` pooling (no extra dimension).

Models without a class token (``class_token=False``) and mean-pooled text
(``text.pool="mean"``) have no OpenCLIP equivalent and are refused.

The tokenizer travels in the folder: ``tokenizer.json`` (``flip.tokenizer.Tokenizer``'s
WordPiece over the shipped BERT-uncased vocabulary, no [CLS]/[SEP]) and
``tokenizer_config.json``. Stock ``open_clip.get_tokenizer("local-dir:<out_dir>")`` sees
``hf_tokenizer_name`` in the config and loads its ``HFTokenizer`` from the folder itself
(``AutoTokenizer.from_pretrained(<out_dir>)``, offline), giving the ids the text tower was
trained on. (The hub's ``bert-base-uncased`` would put [CLS] first, and the tower pools
position 0.) One difference remains: ``transformers`` matches the padding token "[PAD]" as
a special token, so a caption containing that literal text gets id 0 there and word pieces
here. Uploaded to the hub, set ``text_cfg.hf_tokenizer_name`` to the repository's id: for
``hf-hub:`` names OpenCLIP loads the tokenizer named there.

Command line (the architecture travels: from the checkpoint's stored model config on
export, from the export's ``open_clip_config.json`` on import):
    python -m flip.interop.openclip export <ckpt> <out_dir>
    python -m flip.interop.openclip import <out_dir> <out.ckpt>
Files that carry no FLIP model config (older checkpoints, other OpenCLIP folders) need
the architecture named as for training, e.g. ``model=vit_b16 data.image_size=224``;
named next to a file that carries one, it must agree with it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

from flip.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_weights,
    merge_model_config,
    model_config,
    model_state,
    save_flip_checkpoint,
)
from flip.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from flip.errors import ConfigError
from flip.models.clip import FLIP
from flip.tokenizer import Tokenizer

USAGE = """usage: python -m flip.interop.openclip export <ckpt> <out_dir> [model overrides]
       python -m flip.interop.openclip import <out_dir> <out.ckpt> [model overrides]
The architecture comes from the checkpoint / the export; name it (model=vit_b16
data.image_size=224) only for files that store none."""
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_pytorch_model.bin"
TOKENIZER_FILE = "tokenizer.json"  # with tokenizer_config.json: read by transformers' AutoTokenizer

_BLOCK = {  # timm Block -> OpenCLIP ResidualAttentionBlock
    "norm1": "ln_1",
    "attn.qkv": "attn.in_proj",
    "attn.proj": "attn.out_proj",
    "norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


class NotExportable(ValueError):
    """The FLIP configuration has no exact OpenCLIP equivalent."""


def _attn_pool(model: FLIP) -> bool:
    visual = model.visual
    if visual.cls_token is None:
        raise NotExportable(
            "a FLIP image encoder without class token (model.image.class_token=false) "
            "has no OpenCLIP equivalent: OpenCLIP's ViT always prepends one"
        )
    if model.text.pool != "first":
        raise NotExportable("text pool='mean' has no OpenCLIP equivalent (use pool=first)")
    return visual.pool == "avg"


def openclip_config(model: FLIP) -> dict:
    """The OpenCLIP ``model_cfg`` of ``model``."""
    v, t = model.visual, model.text
    attn_pool = _attn_pool(model)
    embed = model.image_proj.out_features + (1 if attn_pool else 0)
    blk_v, blk_t = v.blocks[0], t.blocks[0]
    vision = {
        "image_size": v.patch_embed.img_size[0],
        "patch_size": v.patch_embed.patch_size[0],
        "width": v.width,
        "layers": len(v.blocks),
        "head_width": v.width // blk_v.attn.num_heads,
        "mlp_ratio": blk_v.mlp.fc1.out_features / v.width,
        "no_ln_pre": True,
        "pos_embed_type": "learnable",
        "pool_type": "tok",
        "final_ln_after_pool": False,
    }
    if attn_pool:
        vision.update(attentional_pool=True, attn_pooler_queries=1, attn_pooler_heads=1)
    text = {
        "context_length": t.context_length,
        "vocab_size": t.token_embed.num_embeddings,
        # for local-dir: OpenCLIP loads the tokenizer of the folder (TOKENIZER_FILE)
        "hf_tokenizer_name": "bert-base-uncased",
        "width": t.width,
        "heads": blk_t.attn.num_heads,
        "layers": len(t.blocks),
        "mlp_ratio": blk_t.mlp.fc1.out_features / t.width,
        "no_causal_mask": True,
        "pool_type": "first",
        "proj_bias": False,
        "pad_id": 0,
    }
    for cfg, tower in ((vision, v), (text, t)):  # official-weight options (LayerNorm eps, GELU)
        if tower.norm.eps != 1e-5:
            cfg["norm_kwargs"] = {"eps": tower.norm.eps}
        if tower.blocks[0].mlp.act.approximate != "none":
            cfg["act_kwargs"] = {"approximate": tower.blocks[0].mlp.act.approximate}
    return {"embed_dim": embed, "quick_gelu": False, "vision_cfg": vision, "text_cfg": text}


def _blocks(sd: dict, prefix: str, blocks, out: str) -> dict:
    res = {}
    for i in range(len(blocks)):
        for ours, theirs in _BLOCK.items():
            for p in ("weight", "bias"):
                res[
                    f"{out}.resblocks.{i}.{theirs}_{p}"
                    if theirs == "attn.in_proj"
                    else f"{out}.resblocks.{i}.{theirs}.{p}"
                ] = sd[f"{prefix}.{i}.{ours}.{p}"]
    return res


@torch.no_grad()
def to_openclip_state_dict(model: FLIP) -> dict[str, torch.Tensor]:
    """OpenCLIP ``CLIP`` state dict with the same function as ``model`` (see module doc)."""
    attn_pool = _attn_pool(model)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    v = model.visual
    E = model.image_proj.out_features
    pos = v.pos_embed[0].detach().float().cpu() + sd["visual.patch_embed.proj.bias"]  # (N, W)
    out = {
        "visual.conv1.weight": sd["visual.patch_embed.proj.weight"],
        "visual.class_embedding": sd["visual.cls_token"][0, 0],
        "visual.positional_embedding": torch.cat([torch.zeros(1, v.width), pos]),
        **_blocks(sd, "visual.blocks", v.blocks, "visual.transformer"),
    }
    W_img = sd["image_proj.weight"]  # (E, W)
    if attn_pool:
        D = E + 1
        value = torch.cat([W_img, -W_img.sum(0, keepdim=True)])  # (E + 1, W): mean 0
        pre = "visual.attn_pool"
        out.update(
            {
                f"{pre}.query": torch.zeros(1, D),
                f"{pre}.ln_q.weight": torch.ones(D),
                f"{pre}.ln_q.bias": torch.zeros(D),
                f"{pre}.ln_k.weight": sd["visual.norm.weight"],
                f"{pre}.ln_k.bias": sd["visual.norm.bias"],
                f"{pre}.attn.in_proj_bias": torch.zeros(3 * D),
                f"{pre}.attn.out_proj.weight": torch.eye(D),
                f"{pre}.attn.out_proj.bias": torch.zeros(D),
                "visual.ln_post.weight": torch.ones(D),
                "visual.ln_post.bias": torch.zeros(D),
                "visual.proj": torch.diag(torch.cat([torch.ones(E), torch.zeros(1)])),
            }
        )
        if v.width == D:  # nn.MultiheadAttention packs q, k, v when kdim == embed_dim
            out[f"{pre}.attn.in_proj_weight"] = torch.cat([torch.zeros(2 * D, D), value])
        else:
            out.update(
                {
                    f"{pre}.attn.q_proj_weight": torch.zeros(D, D),
                    f"{pre}.attn.k_proj_weight": torch.zeros(D, v.width),
                    f"{pre}.attn.v_proj_weight": value,
                }
            )
        text_proj = torch.cat([sd["text_proj.weight"].T, torch.zeros(model.text.width, 1)], 1)
    else:
        out.update(
            {
                "visual.ln_post.weight": sd["visual.norm.weight"],
                "visual.ln_post.bias": sd["visual.norm.bias"],
                "visual.proj": W_img.T,
            }
        )
        text_proj = sd["text_proj.weight"].T
    out.update(
        {
            "token_embedding.weight": sd["text.token_embed.weight"],
            "positional_embedding": sd["text.pos_embed"][0],
            **_blocks(sd, "text.blocks", model.text.blocks, "transformer"),
            "ln_final.weight": sd["text.norm.weight"],
            "ln_final.bias": sd["text.norm.bias"],
            "text_projection": text_proj,
            "logit_scale": sd["logit_scale"].reshape(()),
        }
    )
    return {k: t.contiguous().clone() for k, t in out.items()}


def export_openclip(model: FLIP, out_dir, model_cfg: Mapping | None = None) -> Path:
    """Write ``open_clip_config.json``, ``open_clip_pytorch_model.bin`` and the tokenizer
    (``tokenizer.json``, ``tokenizer_config.json``) to ``out_dir``.
    ``model_cfg``: the FLIP model config, kept in the json so an import needs no other."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": openclip_config(model),
        "preprocess_cfg": {
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
        "flip": {
            "note": "the folder's tokenizer (open_clip.get_tokenizer('local-dir:...')) is "
            "FLIP's: BERT uncased WordPiece, no [CLS]/[SEP], length 32; embeddings may "
            "carry one extra zero component"
        },
    }
    if model_cfg is not None:
        config["flip"]["model_config"] = dict(model_cfg)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    context = model.text.context_length
    (out / TOKENIZER_FILE).write_text(Tokenizer(context).to_json())
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "pad_token": "[PAD]",
                "model_max_length": context,
            },
            indent=2,
        )
        + "\n"
    )
    torch.save(to_openclip_state_dict(model), out / WEIGHTS_FILE)
    return out


@torch.no_grad()
def from_openclip_state_dict(
    state: dict[str, torch.Tensor], model: FLIP, atol: float = 1e-4
) -> FLIP:
    """Load an export of :func:`to_openclip_state_dict` back into ``model`` (same config).

    The conv bias is recovered from the positional embedding (minus the sin-cos one);
    an OpenCLIP model whose position embedding is not sin-cos plus a constant is refused."""
    attn_pool = _attn_pool(model)
    v = model.visual
    E = model.image_proj.out_features
    inv = {}
    for tower, blocks, src in (
        ("visual.blocks", v.blocks, "visual.transformer"),
        ("text.blocks", model.text.blocks, "transformer"),
    ):
        for i in range(len(blocks)):
            for ours, theirs in _BLOCK.items():
                for p in ("weight", "bias"):
                    key = (
                        f"{src}.resblocks.{i}.{theirs}_{p}"
                        if theirs == "attn.in_proj"
                        else f"{src}.resblocks.{i}.{theirs}.{p}"
                    )
                    inv[f"{tower}.{i}.{ours}.{p}"] = state[key]
    pos = state["visual.positional_embedding"]
    sincos = v.pos_embed[0].float().cpu()  # the model's fixed table (its channel layout)
    bias = (pos[1:] - sincos).mean(0)
    if (pos[1:] - sincos - bias).abs().max() > atol or pos[0].abs().max() > atol:
        raise NotExportable(
            "this OpenCLIP model's position embedding is not FLIP's fixed sin-cos "
            "plus a constant; it cannot be loaded into a FLIP image encoder"
        )
    inv.update(
        {
            "visual.patch_embed.proj.weight": state["visual.conv1.weight"],
            "visual.patch_embed.proj.bias": bias,
            "visual.cls_token": state["visual.class_embedding"].reshape(1, 1, -1),
            "text.token_embed.weight": state["token_embedding.weight"],
            "text.pos_embed": state["positional_embedding"][None],
            "text.norm.weight": state["ln_final.weight"],
            "text.norm.bias": state["ln_final.bias"],
            "logit_scale": state["logit_scale"].reshape(model.logit_scale.shape),
        }
    )
    if attn_pool:
        pre = "visual.attn_pool"
        packed = state.get(f"{pre}.attn.in_proj_weight")
        value = packed[2 * (E + 1) :] if packed is not None else state[f"{pre}.attn.v_proj_weight"]
        inv.update(
            {
                "visual.norm.weight": state[f"{pre}.ln_k.weight"],
                "visual.norm.bias": state[f"{pre}.ln_k.bias"],
                "image_proj.weight": value[:E],
                "text_proj.weight": state["text_projection"][:, :E].T,
            }
        )
    else:
        inv.update(
            {
                "visual.norm.weight": state["visual.ln_post.weight"],
                "visual.norm.bias": state["visual.ln_post.bias"],
                "image_proj.weight": state["visual.proj"].T,
                "text_proj.weight": state["text_projection"].T,
            }
        )
    model.load_state_dict(inv)
    return model


def import_openclip(folder, model: FLIP) -> FLIP:
    """Load ``<folder>/open_clip_pytorch_model.bin`` (an export) into ``model``."""
    state = torch.load(Path(folder) / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    return from_openclip_state_dict(state, model)


def compose_model_config(overrides: list[str]) -> dict:
    """The model config of the training configs (``pkg://flip.conf``) with these overrides,
    resolved."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="flip.conf", version_base="1.3"):
        cfg = compose("train", overrides=["output_dir=.", *overrides])
    return OmegaConf.to_container(cfg.model, resolve=True)


def _architecture(stored: Mapping | None, overrides: list[str], source: str) -> dict:
    """The model config of ``source``: the one it stores, checked against ``overrides``;
    or the one ``overrides`` name."""
    requested = compose_model_config(overrides) if overrides else None
    if stored is None and requested is None:
        raise CheckpointError(
            f"{source} stores no FLIP model config; name the architecture, "
            "e.g. model=vit_b16 data.image_size=224"
        )
    return (
        dict(requested) if stored is None else merge_model_config(stored, requested, source=source)
    )


def export_checkpoint(ckpt_path, out_dir, overrides: list[str] = ()) -> Path:
    """Export the model of a FLIP checkpoint (architecture from the checkpoint)."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = _architecture(model_config(ckpt), list(overrides), str(ckpt_path))
    model = hydra.utils.instantiate(cfg).eval()
    left_out = load_weights(model, model_state(ckpt), str(ckpt_path))
    if left_out:
        modules = sorted({k.split(".")[0] for k in left_out})
        print(
            f"not exported: {len(left_out)} tensors of the checkpoint outside the CLIP model "
            f"(modules: {', '.join(modules)})"
        )
    return export_openclip(model, out_dir, cfg)


def import_folder(folder, ckpt_path, overrides: list[str] = ()) -> Path:
    """Write the OpenCLIP export in ``folder`` as a FLIP checkpoint that carries its model
    config (``python eval.py ckpt_path=<ckpt_path>`` reads it)."""
    folder = Path(folder)
    config = folder / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}: not an OpenCLIP model folder")
    stored = json.loads(config.read_text()).get("flip", {}).get("model_config")
    cfg = _architecture(stored, list(overrides), str(config))
    model = import_openclip(folder, hydra.utils.instantiate(cfg))
    save_flip_checkpoint(ckpt_path, model, cfg)
    return Path(ckpt_path)


def main(argv: list[str] | None = None) -> None:
    """``export <ckpt> <out_dir> [overrides]`` or ``import <dir> <out.ckpt> [overrides]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[0] not in ("export", "import"):
        raise SystemExit(USAGE)
    cmd, src, dst, overrides = argv[0], argv[1], argv[2], argv[3:]
    try:
        if cmd == "export":
            out = export_checkpoint(src, dst, overrides)
            print(
                f"wrote {out / CONFIG_FILE}, {out / WEIGHTS_FILE} and the tokenizer; load "
                f"with open_clip.create_model('local-dir:{out}') and "
                f"open_clip.get_tokenizer('local-dir:{out}')"
            )
        else:
            out = import_folder(src, dst, overrides)
            print(
                f"wrote {out} (FLIP weights and model config; evaluate with "
                f"python eval.py ckpt_path={out})"
            )
    except (NotExportable, ConfigError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
