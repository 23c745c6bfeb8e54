"""Learning-rate schedule counted in samples seen: linear warm-up, then cosine to 0."""

import math


def warmup_cosine(samples: int, warmup_samples: int, total_samples: int) -> float:
    """Multiplier of the peak learning rate after ``samples`` training samples."""
    if samples < warmup_samples:
        return samples / warmup_samples
    progress = (samples - warmup_samples) / max(1, total_samples - warmup_samples)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
