"""Official FLIP checkpoints (JAX/t5x) -> this project, tested without the download.

The fixture is a small random model written in the t5x on-disk layout (msgpack ``checkpoint``
+ zarr arrays through TensorStore, as ``t5x/checkpoints.py`` writes them), with parameter
names and shapes as the official ``models_flip.py`` (facebookresearch/flip, commit 9bf6bf8)
creates them: checked against ``tests/official_param_shapes.json``, the tree the official
code itself creates (written by ``experiments/official_manifest.py``). The converted model
is compared with a NumPy forward pass written here from the official code's structure
(``VisionTransformer.apply_encoder``, ``Encoder1DBlock``, t5x ``MultiHeadDotProductAttention``
/ ``LayerNorm(epsilon=1e-6)``, ``nn.gelu`` (tanh), ``posembed_util``, ``FLIP.__call__``), not
with our model code."""

import json
import math
import subprocess
import sys
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch

from flip.checkpoint import build_model, load_checkpoint, model_config
from flip.interop import official
from flip.interop.official import OfficialArch, convert, flip_model_config
from flip.tokenizer import Tokenizer

ts = pytest.importorskip("tensorstore")
msgpack = pytest.importorskip("msgpack")

ARCH = OfficialArch(
    patch_size=8,
    image_width=32,
    image_depth=2,
    image_heads=4,
    text_width=24,
    text_depth=2,
    text_heads=2,
    embed_dim=16,
)
IMAGE_SIZE, CONTEXT, VOCAB = 32, 32, 30523  # 4x4 patches; BERT + tf_text's OOV row
TEXTS = ["a red circle", "two blue squares and a small yellow star", "", "the digit 7"]


# --- the official model, in NumPy -------------------------------------------------------


def official_sincos_2d(dim: int, h: int, w: int) -> np.ndarray:
    """posembed_util.get_2d_sincos_pos_embed(dim, (h, w), cls_token=True): (1 + h*w, dim)."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)))
    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def official_params(
    seed: int = 0,
    arch: OfficialArch = ARCH,
    image_size: int = IMAGE_SIZE,
    shapes_only: bool = False,
) -> dict[str, np.ndarray]:
    """Random parameters with the names and shapes models_flip.FLIP creates (t5x DenseGeneral
    stores q/k/v/out kernels flattened to 2-D). shapes_only: zero-stride zeros (any size)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape, std=1.0: (std * rng.standard_normal(shape)).astype(np.float32)
    if shapes_only:
        normal = lambda *shape, std=1.0: np.broadcast_to(np.float32(0), shape)
    p = {}

    def encoder(prefix, d, depth):
        for i in range(depth):
            b = f"{prefix}/Transformer/encoderblock_{i:02d}"
            for ln in ("LayerNorm_0", "LayerNorm_1"):
                p[f"{b}/{ln}/scale"] = 1 + normal(d, std=0.1)
                p[f"{b}/{ln}/bias"] = normal(d, std=0.1)
            for n in ("query", "key", "value", "out"):
                p[f"{b}/MultiHeadDotProductAttention_0/{n}/kernel"] = normal(d, d, std=d**-0.5)
                p[f"{b}/MultiHeadDotProductAttention_0/{n}/bias"] = normal(d, std=0.1)
            # pre-activations of std ~2, where tanh and erf GELU differ most
            p[f"{b}/MlpBlock_0/Dense_0/kernel"] = normal(d, 4 * d, std=2 * d**-0.5)
            p[f"{b}/MlpBlock_0/Dense_0/bias"] = normal(4 * d, std=0.1)
            p[f"{b}/MlpBlock_0/Dense_1/kernel"] = normal(4 * d, d, std=0.3)
            p[f"{b}/MlpBlock_0/Dense_1/bias"] = normal(d, std=0.1)
        p[f"{prefix}/Transformer/encoder_norm/scale"] = 1 + normal(d, std=0.1)
        p[f"{prefix}/Transformer/encoder_norm/bias"] = normal(d, std=0.1)

    a, g = arch, image_size // arch.patch_size
    p["img_encoder/embedding/kernel"] = normal(
        a.patch_size, a.patch_size, 3, a.image_width, std=0.05
    )
    p["img_encoder/embedding/bias"] = normal(a.image_width, std=0.1)
    p["img_encoder/cls"] = normal(1, 1, a.image_width, std=0.5)
    p["img_encoder/posembed_encoder/pos_embedding"] = official_sincos_2d(a.image_width, g, g)[
        None
    ].astype(np.float32)
    encoder("img_encoder", a.image_width, a.image_depth)
    # small text embeddings: LayerNorm's epsilon matters at this scale
    p["txt_encoder/token_embedding/embedding"] = normal(VOCAB, a.text_width, std=0.02)
    p["txt_encoder/posembed_encoder/pos_embedding"] = normal(1, CONTEXT, a.text_width, std=0.02)
    encoder("txt_encoder", a.text_width, a.text_depth)
    p["img_mlp1/kernel"] = normal(a.image_width, a.embed_dim, std=a.image_width**-0.5)
    p["txt_mlp1/kernel"] = normal(a.text_width, a.embed_dim, std=a.text_width**-0.5)
    p["logit_scale"] = np.array([math.log(1 / 0.07) + 0.3], dtype=np.float32)
    return p


def _layer_norm(x, scale, bias):  # t5x LayerNorm, epsilon 1e-6
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * scale + bias


def _gelu(x):  # flax.linen.gelu, approximate=True
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _encoder(p, prefix, x, depth, heads):
    """models_flip.Encoder: pre-norm blocks then encoder_norm."""
    for i in range(depth):
        b = lambda n, i=i: p[f"{prefix}/Transformer/encoderblock_{i:02d}/{n}"]
        y = _layer_norm(x, b("LayerNorm_0/scale"), b("LayerNorm_0/bias"))
        B, L, D = y.shape
        qkv = [
            (
                y @ b(f"MultiHeadDotProductAttention_0/{n}/kernel")
                + b(f"MultiHeadDotProductAttention_0/{n}/bias")
            ).reshape(B, L, heads, D // heads)
            for n in ("query", "key", "value")
        ]
        q, k, v = qkv
        q = q / np.sqrt(D // heads)
        logits = np.einsum("bqhd,bkhd->bhqk", q, k)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        att = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(B, L, D)
        x = (
            x
            + att @ b("MultiHeadDotProductAttention_0/out/kernel")
            + b("MultiHeadDotProductAttention_0/out/bias")
        )
        y = _layer_norm(x, b("LayerNorm_1/scale"), b("LayerNorm_1/bias"))
        y = _gelu(y @ b("MlpBlock_0/Dense_0/kernel") + b("MlpBlock_0/Dense_0/bias"))
        x = x + y @ b("MlpBlock_0/Dense_1/kernel") + b("MlpBlock_0/Dense_1/bias")
    return _layer_norm(
        x,
        p[f"{prefix}/Transformer/encoder_norm/scale"],
        p[f"{prefix}/Transformer/encoder_norm/bias"],
    )


def official_forward(p, images_nhwc, tokens):
    """models_flip.FLIP at evaluation (no mask): normalised embeddings, exp(clipped logit
    scale), and both encoders' output tokens (after encoder_norm)."""
    p = {k: v.astype(np.float64) for k, v in p.items()}
    n, H, W, _ = images_nhwc.shape
    s = ARCH.patch_size
    patches = images_nhwc.reshape(n, H // s, s, W // s, s, 3)  # conv, VALID, stride = kernel
    x = (
        np.einsum("nhpwqc,pqcd->nhwd", patches, p["img_encoder/embedding/kernel"])
        + p["img_encoder/embedding/bias"]
    )
    x = x.reshape(n, -1, x.shape[-1]) + p["img_encoder/posembed_encoder/pos_embedding"][:, 1:]
    x = np.concatenate([np.tile(p["img_encoder/cls"], (n, 1, 1)), x], axis=1)
    x = _encoder(p, "img_encoder", x, ARCH.image_depth, ARCH.image_heads)  # (n, 1 + N, D)
    z_img = x.mean(axis=1) @ p["img_mlp1/kernel"]  # img_avg_token: mean incl. the class token
    z_img /= np.linalg.norm(z_img, axis=-1, keepdims=True) + 1e-8
    t = (
        p["txt_encoder/token_embedding/embedding"][tokens]
        + p["txt_encoder/posembed_encoder/pos_embedding"]
    )
    t = _encoder(p, "txt_encoder", t, ARCH.text_depth, ARCH.text_heads)
    z_txt = t[:, 0] @ p["txt_mlp1/kernel"]  # txt_avg_token False: the first token
    z_txt /= np.linalg.norm(z_txt, axis=-1, keepdims=True) + 1e-8
    scale = np.exp(np.clip(p["logit_scale"][0], 0, math.log(100)))
    return {"image": z_img, "text": z_txt, "scale": scale, "image_tokens": x, "text_tokens": t}


# --- the t5x on-disk layout ---------------------------------------------------------------


def _ext_ndarray(arr: np.ndarray):
    """flax.serialization's msgpack encoding of an array (extension type 1)."""
    return msgpack.ExtType(1, msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes("C"))))


def write_t5x_checkpoint(
    root,
    params: dict,
    step: int = 100000,
    extra_state: bool = True,
    inline: tuple = ("logit_scale",),
    bucket_form: bool = False,
):
    """``root/checkpoint_<step>/``: the msgpack file and one zarr array per parameter (and per
    optimizer moment), each written through TensorStore with t5x's spec (gzip, relative path
    ``target.<flax path>``); the spec, not the array, goes into the msgpack tree. Parameters
    named in ``inline`` are stored in the msgpack file itself (t5x does so for arrays without
    partitioning axes). ``bucket_form``: the spec as t5x stores it for a checkpoint saved to a
    bucket (``_maybe_update_ts_from_file_to_gcs``): the relative path at the top level and a
    placeholder ``gcs`` kvstore, ``{"bucket": "t5x-dummy-bucket", "driver": "gcs"}``."""
    ckpt = root / f"checkpoint_{step}"
    ckpt.mkdir(parents=True)

    def store(name, arr):
        chunks = [max(1, s // 2) for s in arr.shape]  # several chunks per array
        spec = {
            "driver": "zarr",
            "dtype": arr.dtype.name,
            "kvstore": {"driver": "file", "path": name.replace("/", ".")},
            "metadata": {"compressor": {"id": "gzip"}, "shape": list(arr.shape), "chunks": chunks},
        }
        absolute = {
            **spec,
            "kvstore": {"driver": "file", "path": str(ckpt / spec["kvstore"]["path"])},
        }
        ts.open(absolute, create=True, open=True).result().write(arr).result()
        if bucket_form:  # t5x rewrites the dict itself (no ts.Spec normalisation)
            path = spec["kvstore"]["path"]
            return {
                **spec,
                "path": path,
                "kvstore": {"bucket": "t5x-dummy-bucket", "driver": "gcs"},
            }
        return ts.Spec(spec).to_json()  # what flax.serialization stores for a ts.Spec

    def nest(flat, prefix):
        tree = {}
        for name, arr in flat.items():
            *parents, leaf = name.split("/")
            node = tree
            for k in parents:
                node = node.setdefault(k, {})
            node[leaf] = _ext_ndarray(arr) if name in inline else store(f"{prefix}/{name}", arr)
        return tree

    state = {"step": _ext_ndarray(np.array(step, dtype=np.int32))}
    if extra_state:  # AdamW moments: dropped by the conversion
        mu = {k: np.zeros_like(v) for k, v in list(params.items())[:3]}
        state["param_states"] = {"mu": nest(mu, "state/param_states/mu")}
    contents = {"version": 3, "optimizer": {"target": nest(params, "target"), "state": state}}
    (ckpt / "checkpoint").write_bytes(msgpack.packb(contents, use_bin_type=True))
    return ckpt


# --- tests ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    params = official_params()
    write_t5x_checkpoint(root / "flip_tiny_release", params)  # as unzipped: a folder above
    out = convert(root, root / "flip_tiny.ckpt", model=ARCH)
    return params, out


def _inputs():
    images = np.random.default_rng(1).standard_normal((3, IMAGE_SIZE, IMAGE_SIZE, 3))
    tokens = Tokenizer(CONTEXT)(TEXTS)
    return images, tokens


def _embed(model, images_nhwc, tokens) -> dict[str, np.ndarray]:
    images = torch.tensor(images_nhwc, dtype=torch.float32).permute(0, 3, 1, 2)  # NCHW
    with torch.no_grad():
        return {
            "image": model.encode_image(images).numpy(),
            "text": model.encode_text(tokens).numpy(),
            "image_tokens": model.visual.forward_features(images)[0].numpy(),
            "text_tokens": model.text.forward_features(tokens)[0].numpy(),
        }


def test_converted_model_computes_the_official_forward_pass(converted):
    params, out = converted
    model = build_model(out)
    images, tokens = _inputs()
    ref = official_forward(params, images, tokens.numpy())
    got = _embed(model, images, tokens)
    for key in ("image", "text", "image_tokens", "text_tokens"):
        np.testing.assert_allclose(got[key], ref[key], atol=2e-5, rtol=0, err_msg=key)
        assert np.abs(ref[key]).max() > 0.1  # not degenerate
    assert model.scale().item() == pytest.approx(ref["scale"], rel=1e-6)


def test_a_checkpoint_saved_to_a_bucket_converts_to_the_same_weights(converted, tmp_path):
    """The other spec form of official checkpoints (saved to GCS, downloaded into a folder):
    a top-level ``path`` and a dummy-bucket ``gcs`` kvstore; read from the local folder."""
    params, out = converted
    ckpt = write_t5x_checkpoint(tmp_path / "release", params, bucket_form=True)
    tree = msgpack.unpackb((ckpt / "checkpoint").read_bytes(), raw=False)
    spec = tree["optimizer"]["target"]["img_encoder"]["cls"]
    assert spec["kvstore"] == {"bucket": "t5x-dummy-bucket", "driver": "gcs"}
    assert spec["path"] == "target.img_encoder.cls" and "path" not in spec["kvstore"]
    bucket = convert(tmp_path / "release", tmp_path / "bucket.ckpt", model=ARCH)
    ours, reference = load_checkpoint(bucket)["state_dict"], load_checkpoint(out)["state_dict"]
    assert ours.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(ours[k], v), k


@pytest.mark.parametrize(
    "tower, key, value",
    [
        ("image", "gelu_approximate", "none"),
        ("image", "sincos_layout", "timm"),
        ("text", "norm_eps", 1e-5),
        ("text", "gelu_approximate", "none"),
    ],
)
def test_each_official_option_is_needed(converted, tower, key, value):
    """With one option back at torch/timm's value the same weights miss the reference: the
    comparison above is sensitive to every option the conversion sets."""
    params, out = converted
    ckpt = load_checkpoint(out)
    cfg = model_config(ckpt)
    assert cfg[tower][key] != value
    cfg[tower] = {**cfg[tower], key: value}
    model = hydra.utils.instantiate(cfg).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    images, tokens = _inputs()
    ref = official_forward(params, images, tokens.numpy())
    got = _embed(model, images, tokens)
    key = f"{tower}_tokens"
    assert np.abs(got[key] - ref[key]).max() > 2e-4  # 10x the tolerance of the comparison


def test_checkpoint_carries_the_official_model_config(converted):
    _, out = converted
    ckpt = load_checkpoint(out)
    cfg = model_config(ckpt)
    assert cfg == flip_model_config(ARCH, image_size=IMAGE_SIZE, context_length=CONTEXT)
    assert cfg["image"]["norm_eps"] == cfg["text"]["norm_eps"] == 1e-6
    assert cfg["text"]["vocab_size"] == 30523
    assert not any("param_states" in k or "mu" in k for k in ckpt["state_dict"])


@pytest.mark.parametrize("name", ["vit_l16", "vit_h14", "vit_b16"])
def test_model_configs_match_the_official_architectures(name):
    """conf/model/<name>.yaml builds the official architecture with its numerics; only the
    vocabulary differs (our tokenizer's 30522 vs the official embedding's 30523 rows)."""
    import inspect

    from omegaconf import OmegaConf

    from flip.models.image_encoder import ImageEncoder
    from flip.models.text_encoder import TextEncoder
    from tests.conftest import compose_train

    composed = OmegaConf.to_container(
        compose_train(f"model={name}", "data.image_size=224", "mask=0.0").model, resolve=True
    )
    ours = flip_model_config(official.ARCHS[name])
    assert composed["embed_dim"] == ours["embed_dim"]
    for tower, cls in (("image", ImageEncoder), ("text", TextEncoder)):
        defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
        for key in set(composed[tower]) | set(ours[tower]):
            if key in ("mask_ratio", "grad_checkpointing", "mask_kind", "vocab_size"):
                continue  # run-time settings; text masking is ours only; vocabulary above
            assert composed[tower].get(key, defaults.get(key)) == ours[tower].get(
                key, defaults.get(key)
            ), (tower, key)


# names and shapes of the official models_flip.FLIP's parameters, produced by running the
# official code (experiments/official_manifest.py; the command and commit are in the file)
MANIFEST = json.loads((Path(__file__).parent / "official_param_shapes.json").read_text())


@pytest.mark.parametrize("name", ["vit_b16", "vit_l16", "vit_h14"])
def test_the_fixture_has_the_official_models_names_and_shapes(name):
    """The fixture's hand-listed tree equals the one the official code creates, so the
    converter, tested on the fixture, reads the real names; and the real tree is recognised."""
    assert MANIFEST["commit"].startswith("9bf6bf8")
    official_tree = {k: tuple(v) for k, v in MANIFEST["params"][name].items()}
    fixture = official_params(arch=official.ARCHS[name], image_size=224, shapes_only=True)
    assert {k: v.shape for k, v in fixture.items()} == official_tree
    zeros = {k: np.broadcast_to(np.float32(0), v) for k, v in official_tree.items()}
    assert official.infer_arch(zeros) == (name, official.ARCHS[name])


@pytest.mark.parametrize("name", ["vit_b16", "vit_l16", "vit_h14"])
def test_official_shapes_are_recognised(name):
    """The released architectures (official configs, 224 px) are told apart by their shapes."""
    params = official_params(arch=official.ARCHS[name], image_size=224, shapes_only=True)
    assert official.infer_arch(params) == (name, official.ARCHS[name])
    other = "vit_h14" if name != "vit_h14" else "vit_l16"
    with pytest.raises(official.CheckpointError, match=f"not {other}"):
        official.infer_arch(params, other)


def test_leftover_and_missing_parameters_are_refused(tmp_path):
    extra = {
        **official_params(),
        "img_encoder/Transformer/encoderblock_00/extra/kernel": np.ones((2, 2), np.float32),
    }
    write_t5x_checkpoint(tmp_path / "extra", extra)
    with pytest.raises(official.CheckpointError, match="encoderblock_00/extra/kernel"):
        convert(tmp_path / "extra", tmp_path / "a.ckpt", model=ARCH)
    missing = official_params()
    del missing["txt_encoder/Transformer/encoderblock_01/MlpBlock_0/Dense_1/bias"]
    write_t5x_checkpoint(tmp_path / "missing", missing)
    with pytest.raises(
        official.CheckpointError,
        match="lacks txt_encoder/Transformer/encoderblock_01/MlpBlock_0/Dense_1/bias",
    ):
        convert(tmp_path / "missing", tmp_path / "b.ckpt", model=ARCH)
    assert not (tmp_path / "a.ckpt").exists() and not (tmp_path / "b.ckpt").exists()


def test_a_wrong_position_embedding_is_refused(tmp_path):
    params = official_params()
    pos = params["img_encoder/posembed_encoder/pos_embedding"]
    q = ARCH.image_width // 4  # timm's channel layout instead of the official one
    params["img_encoder/posembed_encoder/pos_embedding"] = np.concatenate(
        [pos[..., 2 * q : 3 * q], pos[..., :q], pos[..., 3 * q :], pos[..., q : 2 * q]], axis=-1
    )
    write_t5x_checkpoint(tmp_path, params)
    with pytest.raises(official.CheckpointError, match="position embedding"):
        convert(tmp_path, tmp_path / "c.ckpt", model=ARCH)


def test_command_line_recognises_the_architecture(tmp_path, monkeypatch, capsys):
    write_t5x_checkpoint(tmp_path / "release", official_params())
    monkeypatch.setitem(official.ARCHS, "tiny", ARCH)
    official.main(["convert", str(tmp_path / "release"), str(tmp_path / "out.ckpt")])
    assert "python eval.py ckpt_path=" in capsys.readouterr().out
    assert model_config(load_checkpoint(tmp_path / "out.ckpt"))["image"]["heads"] == 4
    with pytest.raises(SystemExit, match="the checkpoint is not vit_l16"):
        official.main(
            ["convert", str(tmp_path / "release"), str(tmp_path / "x.ckpt"), "--model", "vit_l16"]
        )
    with pytest.raises(SystemExit, match="holds no t5x checkpoint"):
        official.main(["convert", str(tmp_path / "nothing"), str(tmp_path / "x.ckpt")])


def test_converted_checkpoint_evaluates(converted, tmp_path):
    """eval.py's in-process runner reads the converted file with no architecture named and
    gives the held-out top-1 and top-5 of the official forward pass."""
    from hydra import compose, initialize_config_dir

    from flip.run import evaluate
    from tests.conftest import CONF

    _, out = converted
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[
                f"output_dir={tmp_path}",
                f"ckpt_path={out}",
                "data.zeroshot.size=40",
                "data.num_workers=0",
                "trainer.enable_progress_bar=false",
            ],
        )
    metrics = evaluate(cfg)
    # the reference: the official forward pass (NumPy, above) on the same held-out images at
    # the checkpoint's size, each class the normalised mean of its normalised prompts
    params, _ = converted
    cfg.data.image_size = IMAGE_SIZE
    heldout = hydra.utils.instantiate(cfg.data.zeroshot)
    images = np.stack([x.permute(1, 2, 0).numpy() for x, _ in heldout])
    labels = np.array([y for _, y in heldout])
    no_image, tokenizer = np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)), Tokenizer(CONTEXT)
    classes = []
    for name in heldout.classnames:
        prompts = tokenizer([t.format(name) for t in heldout.templates]).numpy()
        text = official_forward(params, no_image, prompts)["text"]
        text = text / np.linalg.norm(text, axis=1, keepdims=True)
        classes.append(text.mean(0) / np.linalg.norm(text.mean(0)))
    image = official_forward(params, images, tokenizer([""]).numpy())["image"]
    logits = image @ np.stack(classes).T
    assert len(labels) == 40
    ranked = np.sort(logits, 1)
    assert (ranked[:, -1] - ranked[:, -2]).min() > 1e-3  # no near-tie float32 could flip
    top5 = np.mean([y in np.argsort(-row)[:5] for row, y in zip(logits, labels)])
    assert metrics["val/zeroshot_top1"] == pytest.approx(np.mean(logits.argmax(1) == labels))
    assert metrics["heldout/zeroshot/top5"] == pytest.approx(top5)
    # the command line, with the converted file as its only argument besides the set's size
    run = subprocess.run(
        [
            sys.executable,
            "eval.py",
            f"ckpt_path={out}",
            "data.zeroshot.size=40",
            f"hydra.run.dir={tmp_path / 'cli'}",
        ],
        cwd=CONF.parent,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert (
        run.stdout.strip()
        .splitlines()[-1]
        .startswith(f"held-out zero-shot top-1: {100 * metrics['val/zeroshot_top1']:.1f}%")
    )


def test_converted_checkpoint_exports_to_openclip(converted, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from flip.interop.openclip import export_checkpoint

    params, out = converted
    folder = export_checkpoint(out, tmp_path / "oc")
    oc = open_clip.create_model(f"local-dir:{folder}").eval()
    images, tokens = _inputs()
    ref = official_forward(params, images, tokens.numpy())
    with torch.no_grad():
        img = oc.encode_image(
            torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2), normalize=True
        )[:, : ARCH.embed_dim]
        txt = oc.encode_text(tokens, normalize=True)[:, : ARCH.embed_dim]
    np.testing.assert_allclose(img.numpy(), ref["image"], atol=2e-5, rtol=0)
    np.testing.assert_allclose(txt.numpy(), ref["text"], atol=2e-5, rtol=0)
