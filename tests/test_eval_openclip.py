"""OpenCLIP interoperability: an exported FLIP model, loaded by stock open-clip-torch from
its folder, gives the same embeddings as FLIP (≤1e-5), and imports back unchanged."""
import json

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir

from flip.interop.openclip import (NotExportable, export_openclip, import_openclip, main,
                                   to_openclip_state_dict)
from flip.tokenizer import Tokenizer
from tests.conftest import CONF

open_clip = pytest.importorskip("open_clip")

TEXTS = ["a red circle", "two blue squares and a small yellow star", "the digit 7", "",
         "a photo of a large dog on the left"]


def make_model(*overrides, seed=0):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=["ckpt_path=unused", "output_dir=/tmp/x",
                                         "model.image.width=48", "model.image.depth=2",
                                         "model.image.heads=2", "model.text.width=32",
                                         "model.text.depth=2", "model.text.heads=2",
                                         "model.embed_dim=24", *overrides])
    torch.manual_seed(seed)
    model = hydra.utils.instantiate(cfg.model).eval()
    with torch.no_grad():  # non-trivial values everywhere (biases, norms, class token)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, cfg


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
    for (k, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(back.state_dict().items())):
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


def test_command_line_export_and_import(tmp_path):
    model, cfg = make_model()
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    size = ["model.image.width=48", "model.image.depth=2", "model.image.heads=2",
            "model.text.width=32", "model.text.depth=2", "model.text.heads=2", "model.embed_dim=24"]
    main(["export", str(ckpt), str(tmp_path / "oc"), *size])  # python -m flip.interop.openclip …
    assert (tmp_path / "oc" / "open_clip_pytorch_model.bin").is_file()
    main(["import", str(tmp_path / "oc"), str(tmp_path / "back.ckpt"), *size])
    back = torch.load(tmp_path / "back.ckpt", weights_only=False)["state_dict"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back[f"model.{k}"], v, atol=1e-6, rtol=0)
