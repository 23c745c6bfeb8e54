"""The periodic zero-shot validation callback during pre-training."""

import pytest

from flip.train import train


def test_callback_logs_the_held_out_accuracy_of_the_current_weights(fast_cfg):
    # FAST: 4 optimiser steps; the callback runs at steps 2 and 4 on data.zeroshot (40 images)
    cfg = fast_cfg(
        "+callbacks.zeroshot._target_=flip.eval.callback.ZeroShotCallback",
        "+callbacks.zeroshot.dataset=${data.zeroshot}",
        "+callbacks.zeroshot.every_n_steps=2",
        "+callbacks.zeroshot.batch_size=16",
    )
    metrics = train(cfg)
    # logged at the last step, on the final weights: the training run's own final number
    assert metrics["val/heldout_top1"] == pytest.approx(metrics["val/zeroshot_top1"], abs=1e-6)
