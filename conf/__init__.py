"""The Hydra configs, installed as ``flip.conf`` (see setup.py): ``pkg://flip.conf``."""
