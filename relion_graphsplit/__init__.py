"""Graph-based initial 3D classification of refined cryo-EM particles."""

__version__ = "0.1.0"
