"""Thin equivalent of `gl-lcm ablate`: python scripts/ablate.py [arguments of gl-lcm ablate]."""
import sys

from gl_lcm.cli import main

sys.exit(main(["ablate", *sys.argv[1:]]))
