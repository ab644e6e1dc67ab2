"""Thin equivalent of `gl-lcm metrics`: python scripts/metrics.py [arguments of gl-lcm metrics]."""
import sys

from gl_lcm.cli import main

sys.exit(main(["metrics", *sys.argv[1:]]))
