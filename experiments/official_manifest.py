"""The parameter names and shapes the official FLIP model creates, from its own code.

    pip install jax==0.4.30 jaxlib==0.4.30 flax==0.8.5 ml-collections   # CPU wheels
    git clone https://github.com/facebookresearch/flip /tmp/flip-official   # commit 9bf6bf8
    python experiments/official_manifest.py /tmp/flip-official --out tests/official_param_shapes.json

Builds ``models_flip.FLIP`` with each released config (``configs/cfg_flip_base.py``,
``cfg_flip_large.py``, ``cfg_flip_huge14.py``) and traces ``init`` with ``jax.eval_shape`` (no
arrays are allocated, so ViT-H/14 takes seconds), at 224 px and 32 text tokens. The json maps
each config to ``{"<flax path>": shape}`` of the ``params`` collection, with the commit of the
official code. ``tests/test_official.py`` checks its fixture and the converter against it, so
a name they shared by mistake cannot pass. The official code (CC-BY-NC) is only run here,
never copied into this repository.
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

CONFIGS = {"vit_b16": "cfg_flip_base", "vit_l16": "cfg_flip_large", "vit_h14": "cfg_flip_huge14"}


def shapes(official: Path, config_module: str) -> dict[str, list[int]]:
    import importlib

    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    sys.path.insert(0, str(official))
    models_flip = importlib.import_module("models_flip")
    config = importlib.import_module(f"configs.{config_module}").get_config()
    model = models_flip.FLIP(config=config.model)
    inputs = {
        "image": jnp.zeros((1, 224, 224, 3), jnp.float32),
        "txt": jnp.zeros((1, 32), jnp.int32),
        "txt_is_valid": jnp.ones((1, 32), jnp.int32),
    }
    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    tree = jax.eval_shape(lambda: model.init(rngs, inputs, train=False))
    return {"/".join(k): list(v.shape) for k, v in flatten_dict(tree["params"]).items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("official", type=Path, help="a checkout of facebookresearch/flip")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    commit = subprocess.run(
        ["git", "-C", str(a.official), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    manifest = {
        "source": "facebookresearch/flip models_flip.FLIP(config.model).init, jax.eval_shape",
        "commit": commit or "unknown",
        "command": "python experiments/official_manifest.py <checkout> --out " + str(a.out),
        "params": {name: shapes(a.official, module) for name, module in CONFIGS.items()},
    }
    text = json.dumps(manifest, indent=1, sort_keys=True)
    text = re.sub(
        r"\[\s+([\d,\s]+?)\s+\]",
        lambda m: "[" + ", ".join(re.findall(r"\d+", m.group(1))) + "]",
        text,
    )
    a.out.write_text(text + "\n")  # one line per parameter
    print(f"wrote {a.out}: " + ", ".join(f"{k} {len(v)}" for k, v in manifest["params"].items()))


if __name__ == "__main__":
    main()
