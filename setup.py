"""Package list for setuptools (the rest of the metadata is in pyproject.toml).

The demo (model, instance images, class prompts, scorer) stays in the repository's top-level
assets/ folder and installs as the subpackage ``loha_diffusion.demo_assets``, so that the demo
also runs from an installed wheel. pyproject.toml alone cannot combine package discovery with
mapping one subpackage onto another folder.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["loha_diffusion", "loha_diffusion.*"]) + ["loha_diffusion.demo_assets"],
    package_dir={"loha_diffusion.demo_assets": "assets"},
)
