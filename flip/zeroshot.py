"""Zero-shot classification from text prompts (CLIP protocol)."""
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def build_zero_shot_classifier(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str = "cpu",
    classes_per_batch: int = 1,
) -> torch.Tensor:
    """(num_classes, D) class embeddings: the normalised mean of each class's
    normalised prompt embeddings (one prompt per template).

    classes_per_batch: how many classes' prompts go through ``encode_text`` at once
    (1: one forward per class; more is faster for 1000-class sets)."""
    weights = []
    for start in range(0, len(classnames), classes_per_batch):
        names = classnames[start:start + classes_per_batch]
        tokens = tokenizer([t.format(name) for name in names for t in templates]).to(device)
        prompts = F.normalize(encode_text(tokens), dim=-1)  # (c * T, D)
        prompts = prompts.view(len(names), len(templates), -1)
        weights.append(F.normalize(prompts.mean(1), dim=-1))
    return torch.cat(weights)  # (C, D)


def format_zero_shot(top1: float, num_classes: int) -> str:
    """The one-line report of a held-out zero-shot evaluation, accuracy next to chance."""
    return f"held-out zero-shot top-1: {100 * top1:.1f}% (chance {100 / num_classes:.1f}%)"
