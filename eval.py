"""FLIP evaluation entry point (see conf/eval.yaml and README "Evaluate").

python eval.py ckpt_path=…                              # held-out zero-shot top-1
python eval.py ckpt_path=… eval_task=suite              # held-out zero-shot, retrieval, linear probe
python eval.py ckpt_path=… eval_task=zeroshot eval_data=imagenet data_root=/data
"""

import hydra
from omegaconf import DictConfig

from flip.config import run_or_exit
from flip.eval.runner import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_or_exit(evaluate, cfg)


if __name__ == "__main__":
    main()
