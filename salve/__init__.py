"""SALVE: sparse-autoencoder latent vector editing for image classifiers.

The method as a library: pure functions and small classes, no orchestration, no file layout.
Stage wiring lives in ``tasks/`` (file I/O) and ``flows/`` (Prefect).
"""

__version__ = "0.1.0"
