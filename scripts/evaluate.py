"""Thin equivalent of `gl-lcm evaluate`: python scripts/evaluate.py [arguments of gl-lcm evaluate]."""
import sys

from gl_lcm.cli import main

sys.exit(main(["evaluate", *sys.argv[1:]]))
