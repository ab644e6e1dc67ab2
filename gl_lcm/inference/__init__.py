"""The one inference engine (GL-LCM on a batch of films) and what it is built from."""
from gl_lcm.inference.engine import STAGES, GLLCMResult, InferenceEngine, StageTimer
from gl_lcm.inference.segmenter import Segmenter
from gl_lcm.inference.settings import FusionSettings, PixelSettings, SamplingSettings, sample_single_path

__all__ = ["STAGES", "GLLCMResult", "InferenceEngine", "StageTimer", "Segmenter", "FusionSettings",
           "PixelSettings", "SamplingSettings", "sample_single_path"]
