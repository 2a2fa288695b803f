"""hwslim's version, in one place: the modules that record it import it from here, so that
``hwslim/__init__.py`` (the lazy Python API) is imported by none of them."""
__version__ = "0.1.0"
