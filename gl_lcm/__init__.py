"""GL-LCM: global-local latent consistency models for bone suppression in chest X-rays."""

__version__ = "0.1.0"
