"""``flip-train [overrides]``: pre-training or a downstream task (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from flip.cli import CONFIG_PATH, run_or_exit
from flip.run import train


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    run_or_exit(train, cfg)


if __name__ == "__main__":
    main()
