"""FLIP evaluation entry point: `python eval.py ckpt_path=… [model=…] [data=…]`."""
import hydra
from omegaconf import DictConfig

from flip.config import ConfigError
from flip.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except ConfigError as err:  # one clear sentence, no traceback
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
