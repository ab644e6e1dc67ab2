"""Thin equivalent of `gl-lcm eval-vqgan`: python scripts/eval_vqgan.py [arguments of gl-lcm eval-vqgan]."""
import sys

from gl_lcm.cli import main

sys.exit(main(["eval-vqgan", *sys.argv[1:]]))
