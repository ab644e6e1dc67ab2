"""Thin equivalent of `gl-lcm distill`: python scripts/distill.py [arguments of gl-lcm distill]."""
import sys

from gl_lcm.cli import main

sys.exit(main(["distill", *sys.argv[1:]]))
