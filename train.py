"""FLIP pre-training entry point: `python train.py [overrides]` (see conf/train.yaml)."""
import hydra
from omegaconf import DictConfig

from flip.config import ConfigError
from flip.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except ConfigError as err:  # one clear sentence, no traceback
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
