"""The embedded demo: model, instance images, class prompts and scorer.

Installed with the package as ``loha_diffusion.demo_assets`` (see setup.py), where the trainer
finds it when it runs with no model given; ``--demo_assets DIR`` points it at a copy elsewhere.
"""
