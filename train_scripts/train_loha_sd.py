"""DreamBooth-style LoHa / LoRA / LoKr training for Stable Diffusion.

    accelerate launch train_scripts/train_loha_sd.py            # the embedded demo
    accelerate launch train_scripts/train_loha_sd.py --help     # every flag
"""
import sys

from loha_diffusion.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
