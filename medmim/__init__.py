"""medmim: masked image modelling for medical imaging research."""

__version__ = "0.1.0"
