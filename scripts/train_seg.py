"""Thin equivalent of `gl-lcm train-seg`: python scripts/train_seg.py [arguments of gl-lcm train-seg]."""
import sys

from gl_lcm.cli import main

sys.exit(main(["train-seg", *sys.argv[1:]]))
