"""Thin equivalent of `gl-lcm suppress`: python scripts/suppress.py [arguments of gl-lcm suppress]."""
import sys

from gl_lcm.cli import main

sys.exit(main(["suppress", *sys.argv[1:]]))
