"""``flip-eval ckpt_path=… [overrides]``: evaluation of a checkpoint (see conf/eval.yaml)."""

import hydra
from omegaconf import DictConfig

from flip.cli import CONFIG_PATH, run_or_exit
from flip.run import evaluate


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> None:
    run_or_exit(evaluate, cfg)


if __name__ == "__main__":
    main()
