"""Installed entry points, usable from any directory:

    flip-train [overrides]            # = python train.py [overrides] in the repository
    flip-eval ckpt_path=… [overrides] # = python eval.py …
    python -m flip.cli train|eval [overrides]

The same Hydra mains as the repository's ``train.py``/``eval.py``, with the configs read
from the installed package (``pkg://flip.conf``: the repository's ``conf/``, installed as
``flip.conf``) instead of a path next to the script. Each command imports only its own
stack.
"""
import sys

import hydra
from omegaconf import DictConfig

from flip.config import run_or_exit

CONFIG_PATH = "pkg://flip.conf"


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def train_main(cfg: DictConfig) -> None:
    from flip.train import train

    run_or_exit(train, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def eval_main(cfg: DictConfig) -> None:
    from flip.eval.runner import evaluate

    run_or_exit(evaluate, cfg)


COMMANDS = {"train": train_main, "eval": eval_main}


def main() -> None:
    """``python -m flip.cli <command> [overrides]``: Hydra reads the overrides from sys.argv."""
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        raise SystemExit(f"usage: python -m flip.cli {{{','.join(COMMANDS)}}} [overrides]")
    command = sys.argv.pop(1)
    sys.argv[0] = f"flip-{command}"
    COMMANDS[command]()


if __name__ == "__main__":
    main()
