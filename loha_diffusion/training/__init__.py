"""The DreamBooth trainer behind ``train_scripts/train_loha_sd.py``."""
