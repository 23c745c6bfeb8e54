"""FLIP evaluation of a checkpoint (see conf/eval.yaml and README "Evaluate").

python eval.py ckpt_path=…                              # held-out zero-shot top-1
python eval.py ckpt_path=… eval_task=suite              # held-out zero-shot, retrieval, linear probe
python eval.py ckpt_path=… eval_task=zeroshot eval_data=imagenet data_root=/data
"""

from flip.cli.eval import main

if __name__ == "__main__":
    main()
