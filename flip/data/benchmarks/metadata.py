"""Class names, prompt templates and label spaces shipped in ``metadata/`` (see its README).

A class-name or template *spec* in an ``eval_data`` config is one of:

- ``imagenet``: the 1000 CLIP ImageNet class names / the ImageNet templates chosen by
  ``zeroshot.imagenet_templates`` (``simple7``, the paper's 7, or ``openai80``);
- ``clip:<Dataset>``: OpenAI CLIP's ``data/prompts.md`` entry (e.g. ``clip:CIFAR10``);
- ``cb:<key>``: CLIP_benchmark's class names in torchvision label order (e.g. ``cb:pets``),
  read from the installed ``clip_benchmark`` package;
- a list of strings.
"""

import functools
import json
from pathlib import Path

METADATA = Path(__file__).resolve().parent / "metadata"
IMAGENET_TEMPLATE_SETS = ("simple7", "openai80")


def _lines(name: str) -> list[str]:
    return [line.rstrip("\n") for line in (METADATA / name).read_text("utf-8").splitlines()]


@functools.cache
def _json(name: str) -> dict:
    return json.loads((METADATA / name).read_text("utf-8"))


@functools.cache
def imagenet_classnames() -> tuple[str, ...]:
    return tuple(_lines("imagenet_classnames.txt"))


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in label order."""
    return tuple(_lines("imagenet_synsets.txt"))


@functools.cache
def imagenet_wnid_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(imagenet_wnids())}


@functools.cache
def label_space(name: str) -> tuple[str, ...]:
    """WordNet ids of a label space: ``imagenet`` (1000), ``imagenet_a`` / ``imagenet_r`` (200)."""
    files = {
        "imagenet": "imagenet_synsets.txt",
        "imagenet_a": "imagenet_a_synsets.txt",
        "imagenet_r": "imagenet_r_synsets.txt",
    }
    if name not in files:
        raise ValueError(f"unknown label space {name!r}; known: {sorted(files)}")
    return tuple(_lines(files[name]))


@functools.cache
def _clip_benchmark_classnames() -> dict:
    from importlib.resources import files

    return json.loads(
        files("clip_benchmark.datasets").joinpath("en_classnames.json").read_text("utf-8")
    )


def imagenet_templates(kind: str = "simple7") -> tuple[str, ...]:
    if kind not in IMAGENET_TEMPLATE_SETS:
        raise ValueError(
            f"zeroshot.imagenet_templates={kind!r}: use one of {IMAGENET_TEMPLATE_SETS}"
        )
    return tuple(_lines(f"imagenet_templates_{kind}.txt"))


def clip_prompts(dataset: str) -> dict:
    prompts = _json("clip_prompts.json")
    if dataset not in prompts:
        raise ValueError(f"no CLIP prompts for {dataset!r}; known: {sorted(prompts)}")
    return prompts[dataset]


def classnames(spec) -> list[str]:
    """Resolve a class-name spec (see the module docstring)."""
    if isinstance(spec, str):
        if spec == "imagenet":
            return list(imagenet_classnames())
        if spec.startswith("clip:"):
            return list(clip_prompts(spec[5:])["classes"])
        if spec.startswith("cb:"):
            table = _clip_benchmark_classnames()
            if spec[3:] not in table:
                raise ValueError(
                    f"no CLIP_benchmark class names for {spec[3:]!r}; known: {sorted(table)}"
                )
            return list(table[spec[3:]])
        raise ValueError(
            f"unknown class-name spec {spec!r} (imagenet | clip:<name> | cb:<name> | a list)"
        )
    return [str(s) for s in spec]


def templates(spec, imagenet_set: str = "simple7") -> list[str]:
    """Resolve a template spec (see the module docstring)."""
    if isinstance(spec, str):
        if spec == "imagenet":
            return list(imagenet_templates(imagenet_set))
        if spec.startswith("clip:"):
            return list(clip_prompts(spec[5:])["templates"])
        raise ValueError(f"unknown template spec {spec!r} (imagenet | clip:<name> | a list)")
    out = [str(s) for s in spec]
    for t in out:
        if "{}" not in t:
            raise ValueError(f"template {t!r} has no '{{}}' placeholder for the class name")
    return out
