"""Thin equivalent of `gl-lcm train-vqgan`: python scripts/train_vqgan.py [arguments of gl-lcm train-vqgan]."""
import sys

from gl_lcm.cli import main

sys.exit(main(["train-vqgan", *sys.argv[1:]]))
