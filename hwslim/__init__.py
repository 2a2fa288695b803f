"""hwslim: hardware-aware AutoSlim. Channel counts for the best accuracy under a real budget."""
__version__ = "0.1.0"
