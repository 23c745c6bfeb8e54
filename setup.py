"""Package layout (everything else is in pyproject.toml): the library under flip/, and the Hydra
configs at the top-level conf/ installed as the package ``flip.conf``, so installed code finds them
as ``pkg://flip.conf`` (or ``importlib.resources.files("flip.conf")``) from any directory."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["flip", "flip.*"]), "flip.conf"],
    package_dir={"flip.conf": "conf"},
)
