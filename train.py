"""FLIP pre-training or a downstream task: `python train.py [overrides]` (see conf/train.yaml)."""

from flip.cli.train import main

if __name__ == "__main__":
    main()
