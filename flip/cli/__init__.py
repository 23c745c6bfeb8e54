"""Installed entry points, usable from any directory:

    flip-train [overrides]              # = python train.py [overrides] in the repository
    flip-eval ckpt_path=… [overrides]   # = python eval.py ckpt_path=… [overrides]
    python -m flip.cli train|eval [overrides]

The same Hydra mains as the repository's ``train.py``/``eval.py``, with the configs read
from the installed package (``pkg://flip.conf``: the repository's ``conf/``, installed as
``flip.conf``) instead of a path next to the script. One module per command, named like
the scripts, so Hydra names the job (log file, SLURM job) ``train`` or ``eval`` as well.
"""

CONFIG_PATH = "pkg://flip.conf"
