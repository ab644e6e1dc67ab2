"""Thin equivalent of `gl-lcm split`: python scripts/split.py [arguments of gl-lcm split]."""
import sys

from gl_lcm.cli import main

sys.exit(main(["split", *sys.argv[1:]]))
