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
) -> torch.Tensor:
    """(num_classes, D) class embeddings: the normalised mean of each class's
    normalised prompt embeddings (one prompt per template)."""
    weights = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        prompts = F.normalize(encode_text(tokens), dim=-1)  # (T, D)
        weights.append(F.normalize(prompts.mean(0), dim=-1))
    return torch.stack(weights)  # (C, D)


def format_zero_shot(top1: float, num_classes: int) -> str:
    """The one-line report of a held-out zero-shot evaluation, accuracy next to chance."""
    return f"held-out zero-shot top-1: {100 * top1:.1f}% (chance {100 / num_classes:.1f}%)"
