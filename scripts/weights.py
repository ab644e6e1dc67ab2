"""Thin equivalent of `gl-lcm weights`: python scripts/weights.py lpips [--from FILE] [--dest DIR]."""
import sys

from gl_lcm.cli import main

sys.exit(main(["weights", *sys.argv[1:]]))
