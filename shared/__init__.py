"""Code both sides of the fleet use: config, storage, stage framework, model loading."""
__version__ = "0.1.0"
