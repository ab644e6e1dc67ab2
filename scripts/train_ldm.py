"""Thin equivalent of `gl-lcm train-ldm`: python scripts/train_ldm.py [arguments of gl-lcm train-ldm]."""
import sys

from gl_lcm.cli import main

sys.exit(main(["train-ldm", *sys.argv[1:]]))
