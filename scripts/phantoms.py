"""Thin equivalent of `gl-lcm phantoms`: python scripts/phantoms.py [arguments of gl-lcm phantoms]."""
import sys

from gl_lcm.cli import main

sys.exit(main(["phantoms", *sys.argv[1:]]))
