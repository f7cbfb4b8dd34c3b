"""eventrouter: take in game events once and route them to every sink that needs them."""

__version__ = "0.1.0"
