"""The progress bar of runs counted in optimiser steps."""

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's bar for runs counted in steps (``max_epochs=-1``): "Epoch 3", where
    Lightning prints the limit minus one, "Epoch 3/-2"."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs != -1:
            return super()._get_train_description(current_epoch)
        return f"Epoch {current_epoch}".ljust(len(self.validation_description))
