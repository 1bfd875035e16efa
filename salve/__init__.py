"""SALVE: sparse-autoencoder latent vector editing for image classifiers.

The method as a library: pure functions and small classes, no orchestration, no file layout.
Stage wiring lives in ``tasks/`` (file I/O) and ``flows/`` (Prefect).

Tensor names end in their shape, one letter per axis: ``n`` samples, ``m`` the head's input
width (activations, decoder columns), ``d`` SAE latents, ``k`` classes, ``f`` features being
edited, ``a`` alpha values, ``hw`` a spatial map. So ``acts_nm`` is [N, M], ``codes_nd`` is
[N, D], ``weight_km`` the head weight [K, M].
"""

from salve.runtime import apply_base_settings as _apply_base_settings

__version__ = "0.1.0"

# Run-to-run identical MKL results (salve/runtime.py); set before any tensor operation.
_apply_base_settings()


def __getattr__(name: str):
    """`salve.load_classifier(path)`: a trained or edited checkpoint as a plain torchvision
    model, a steered one (edit.mode: steer) as backbone -> steering -> head (imported on first
    use, so `import salve` stays light)."""
    if name == "load_classifier":
        from salve.models import load_classifier

        return load_classifier
    raise AttributeError(f"module 'salve' has no attribute {name!r}")
