"""OpenCLIP interoperability: an exported FLIP model, loaded by stock open-clip-torch from
its folder, gives the same embeddings as FLIP (≤1e-5), and imports back unchanged; the
command line reads the architecture from the files."""

import json

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from flip.checkpoint import load_checkpoint, model_config, model_state, save_flip_checkpoint
from flip.interop.openclip import (
    NotExportable,
    export_openclip,
    import_openclip,
    main,
    to_openclip_state_dict,
)
from flip.tokenizer import Tokenizer
from tests.conftest import compose_train

open_clip = pytest.importorskip("open_clip")

TEXTS = [
    "a red circle",
    "two blue squares and a small yellow star",
    "the digit 7",
    "",
    "a photo of a large dog on the left",
]


SMALL = [
    "model.image.width=48",
    "model.image.depth=2",
    "model.image.heads=2",
    "model.text.width=32",
    "model.text.depth=2",
    "model.text.heads=2",
    "model.embed_dim=24",
]


def make_model(*overrides, seed=0):
    """A small FLIP with non-trivial values everywhere and its resolved model config."""
    cfg = compose_train("mask=0.0", *SMALL, *overrides)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(seed)
    model = hydra.utils.instantiate(model_cfg).eval()
    with torch.no_grad():  # non-trivial values everywhere (biases, norms, class token)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, model_cfg


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_openclip_gives_the_same_embeddings(pool, tmp_path):
    model, _ = make_model(f"model.image.pool={pool}")
    out = export_openclip(model, tmp_path / "export")
    oc = open_clip.create_model(f"local-dir:{out}").eval()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tokens = Tokenizer(32)(TEXTS)
    with torch.no_grad():
        ours_i, ours_t = model.encode_image(images), model.encode_text(tokens)
        theirs_i = oc.encode_image(images, normalize=True)
        theirs_t = oc.encode_text(tokens, normalize=True)
    E = model.image_proj.out_features
    extra = theirs_i.shape[1] - E
    assert extra == (1 if pool == "avg" else 0)
    torch.testing.assert_close(theirs_i[:, :E], ours_i, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs_t[:, :E], ours_t, atol=1e-5, rtol=0)
    if extra:  # the zero-mean helper component is dropped again by proj
        assert theirs_i[:, E:].abs().max() <= 1e-6 and theirs_t[:, E:].abs().max() == 0
    assert oc.logit_scale.exp().item() == pytest.approx(model.scale().item())
    cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    assert cfg["vision_cfg"]["no_ln_pre"] and cfg["text_cfg"]["no_causal_mask"]
    assert cfg["text_cfg"]["context_length"] == 32 and cfg["text_cfg"]["vocab_size"] == 30522

    back, _ = make_model(f"model.image.pool={pool}", seed=5)  # different weights, then import
    import_openclip(out, back)
    for (k, a), (_, b) in zip(
        sorted(model.state_dict().items()), sorted(back.state_dict().items())
    ):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=k)


def test_state_dict_loads_strictly_into_openclip(tmp_path):
    model, _ = make_model()
    out = export_openclip(model, tmp_path)
    cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    oc = open_clip.model.CLIP(**cfg)
    missing = oc.load_state_dict(to_openclip_state_dict(model), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys


def test_models_without_an_openclip_equivalent_are_refused(tmp_path):
    model, _ = make_model("model.image.class_token=false")
    with pytest.raises(NotExportable, match="class token"):
        export_openclip(model, tmp_path)
    model, _ = make_model("model.text.pool=mean")
    with pytest.raises(NotExportable, match="mean"):
        export_openclip(model, tmp_path)


def assert_same_weights(state: dict, model: torch.nn.Module) -> None:
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(state[k], v, atol=1e-6, rtol=0, msg=k)


def test_command_line_reads_the_architecture_from_the_files(tmp_path, capsys):
    model, model_cfg = make_model("model.image.pool=token")  # not the default pool either
    ckpt = tmp_path / "m.ckpt"
    save_flip_checkpoint(ckpt, model, model_cfg)
    main(["export", str(ckpt), str(tmp_path / "oc")])  # python -m flip.interop.openclip …
    assert (tmp_path / "oc" / "open_clip_pytorch_model.bin").is_file()
    main(["import", str(tmp_path / "oc"), str(tmp_path / "back.ckpt")])
    back = load_checkpoint(tmp_path / "back.ckpt")  # weights only
    assert model_config(back) == model_cfg  # the imported checkpoint carries its architecture
    assert_same_weights(model_state(back), model)
    assert "python eval.py ckpt_path=" in capsys.readouterr().out


def test_command_line_refuses_an_override_that_contradicts_the_checkpoint(tmp_path):
    model, model_cfg = make_model()
    ckpt = tmp_path / "m.ckpt"
    save_flip_checkpoint(ckpt, model, model_cfg)
    with pytest.raises(SystemExit, match=r"model.image.depth=3 .*model.image.depth=2"):
        main(["export", str(ckpt), str(tmp_path / "oc"), *SMALL, "model.image.depth=3"])
    main(["export", str(ckpt), str(tmp_path / "oc"), *SMALL])  # agreeing overrides: fine
    with pytest.raises(SystemExit, match=r"model.embed_dim=32 .*model.embed_dim=24"):
        main(
            ["import", str(tmp_path / "oc"), str(tmp_path / "b.ckpt"), *SMALL, "model.embed_dim=32"]
        )


def test_command_line_needs_the_architecture_only_for_files_without_one(tmp_path, capsys):
    model, _ = make_model()
    ckpt = tmp_path / "plain.ckpt"  # an old-style checkpoint: weights, no model config
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["model.decoder.weight"] = torch.zeros(3, 3)  # a training-only module
    torch.save({"state_dict": state}, ckpt)
    with pytest.raises(SystemExit, match="stores no FLIP model config; name the architecture"):
        main(["export", str(ckpt), str(tmp_path / "oc")])
    main(["export", str(ckpt), str(tmp_path / "oc"), *SMALL])
    assert "not exported: 1 tensors" in capsys.readouterr().out  # reported, not dropped silently
    config = tmp_path / "oc" / "open_clip_config.json"
    cfg = json.loads(config.read_text())
    del cfg["flip"]["model_config"]  # as in an OpenCLIP folder from elsewhere
    config.write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="stores no FLIP model config"):
        main(["import", str(tmp_path / "oc"), str(tmp_path / "back.ckpt")])
    main(["import", str(tmp_path / "oc"), str(tmp_path / "back.ckpt"), *SMALL])
    assert_same_weights(model_state(load_checkpoint(tmp_path / "back.ckpt")), model)


def test_a_checkpoint_with_pickled_code_is_refused(tmp_path):
    ckpt = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "callback": Tokenizer(32)}, ckpt)  # an arbitrary object
    with pytest.raises(SystemExit, match=f"{ckpt} is refused"):
        main(["export", str(ckpt), str(tmp_path / "oc")])


STOCK_USER = """
import json, sys
import open_clip, torch
folder, images = sys.argv[1], torch.load(sys.argv[2])
model = open_clip.create_model("local-dir:" + folder).eval()
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
tokens = tokenizer(json.loads(sys.argv[3]))
with torch.no_grad():
    image, text = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
torch.save({"tokens": tokens, "image": image, "text": text}, sys.argv[4])
"""


def test_a_stock_openclip_user_gets_our_tokens_and_embeddings_offline(tmp_path):
    """The export loaded as a stock user would: a fresh process that imports only open_clip
    and torch, offline (HF_HUB_OFFLINE=1), tokenizer and model from the folder alone."""
    import os
    import subprocess
    import sys

    pytest.importorskip("transformers")  # open_clip's HFTokenizer
    model, _ = make_model()
    out = export_openclip(model, tmp_path / "export")
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    torch.save(images, tmp_path / "images.pt")
    texts = [*TEXTS, "A CAFÉ   with 3 tables, by the river!", "word " * 40]  # accents, > 32
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-c", STOCK_USER, str(out), str(tmp_path / "images.pt"),
         json.dumps(texts), str(tmp_path / "stock.pt")],
        check=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    stock = torch.load(tmp_path / "stock.pt")
    ours = Tokenizer(32)(texts)
    assert ours[:, 0].ne(101).all()  # no [CLS] first: the tower pools position 0
    assert torch.equal(stock["tokens"], ours)
    with torch.no_grad():
        ours_i, ours_t = model.encode_image(images), model.encode_text(ours)
    E = model.image_proj.out_features
    torch.testing.assert_close(stock["image"][:, :E], ours_i, atol=1e-5, rtol=0)
    torch.testing.assert_close(stock["text"][:, :E], ours_t, atol=1e-5, rtol=0)
