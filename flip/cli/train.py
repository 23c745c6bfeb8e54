"""``flip-train [overrides]``: FLIP pre-training from the installed configs (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from flip.cli import CONFIG_PATH
from flip.config import run_or_exit
from flip.train import train


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    run_or_exit(train, cfg)


if __name__ == "__main__":
    main()
