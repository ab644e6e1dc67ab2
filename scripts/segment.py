"""Thin equivalent of `gl-lcm segment`: python scripts/segment.py [arguments of gl-lcm segment]."""
import sys

from gl_lcm.cli import main

sys.exit(main(["segment", *sys.argv[1:]]))
