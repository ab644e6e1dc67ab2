"""Moved to :mod:`gl_lcm.utils.checkpoint` (checkpoints serve models and training alike);
this name stays so older imports keep working."""
from gl_lcm.utils.checkpoint import (  # noqa: F401
    find_latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
