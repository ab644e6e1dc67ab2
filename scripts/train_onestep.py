"""Thin equivalent of `gl-lcm train-onestep`: python scripts/train_onestep.py [arguments of gl-lcm train-onestep]."""
import sys

from gl_lcm.cli import main

sys.exit(main(["train-onestep", *sys.argv[1:]]))
