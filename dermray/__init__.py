"""dermray: Esteva et al. 2017 on Ray."""
__version__ = "0.1.0"
