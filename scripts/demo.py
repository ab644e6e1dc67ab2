"""Thin equivalent of `gl-lcm demo`: python scripts/demo.py [arguments of gl-lcm demo]."""
import sys

from gl_lcm.cli import main

sys.exit(main(["demo", *sys.argv[1:]]))
