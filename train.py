#!/usr/bin/env python
"""`python train.py --config configs/training/small_model.json`: the same program as
pretrain_gpt.py, under the name the configs README uses (torchrun works with either)."""
import sys

from pretrain_gpt import main

if __name__ == "__main__":
    sys.exit(main())
