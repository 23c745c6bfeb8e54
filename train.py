"""FLIP pre-training entry point: `python train.py [overrides]` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from flip.config import run_or_exit
from flip.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run_or_exit(train, cfg)


if __name__ == "__main__":
    main()
