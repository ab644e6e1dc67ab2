"""The machine line every benchmark prints under its table (gl_lcm.utils.machine)."""
from gl_lcm.utils.machine import machine_line  # noqa: F401  (re-exported for the scripts)
