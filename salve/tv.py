"""The one place that imports torchvision.

torchvision wheels on PyPI are CUDA builds. Against a CPU-only torch their compiled extension
(`torchvision._C`) cannot load, and `import torchvision` then dies inside
`torchvision/_meta_registrations.py`, which registers fake kernels for `torchvision::nms` and
`torchvision::qnms`, operators that only the extension defines. Models, transforms and datasets
are pure Python and work fine without it.

`import_torchvision()` imports torchvision normally. Only if that import fails with exactly this
missing-operator error does it define the operator schemas (no kernels) under the `torchvision`
namespace, so the meta registrations succeed, and import again. A working CUDA or CPU install is
never touched. `EXTENSION_STUBBED` records whether the fallback was used; the compiled ops (nms,
roi_align, ...) remain unavailable in that case, and SALVE does not use them.

`torchvision.ops.roi_align` (imported by `torchvision.models`) does one thing at import time that
costs more than all of torch: `from torch._dynamo.utils import is_compile_supported`, which
loads the whole compiler stack (dynamo, fx, sympy): about 6 s of every `salve` command, DVC stage
process and worker on a 2-core machine, for a function called only inside `roi_align`. While
torchvision is imported, that one name comes from a placeholder module whose function imports
the real one on first call; the placeholder is removed right after, so any later
`import torch._dynamo` (torch.compile, ...) gets the real module. Nothing changes when dynamo is
already loaded.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from types import ModuleType

import torch

EXTENSION_STUBBED = False
_LIBRARY: torch.library.Library | None = None

# `_meta_registrations.py` guards most fake kernels with `extension._has_ops()`; only these two
# are registered unconditionally with `torch.library.register_fake`, so only these need a schema.
_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _is_missing_extension_error(exc: BaseException) -> bool:
    text = str(exc)
    return "torchvision::" in text and "does not exist" in text


def _forget_partial_import() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def _define_op_schemas() -> None:
    global _LIBRARY
    _LIBRARY = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 - kept alive on purpose
    for schema in _OP_SCHEMAS:
        _LIBRARY.define(schema)


_DYNAMO_UTILS = "torch._dynamo.utils"


def _is_compile_supported(device_type):  # roi_align's only use of dynamo, resolved when called
    from torch._dynamo.utils import is_compile_supported

    return is_compile_supported(device_type)


@contextlib.contextmanager
def _dynamo_deferred() -> Iterator[None]:
    """Serve `torch._dynamo.utils.is_compile_supported` lazily while torchvision imports."""
    if _DYNAMO_UTILS in sys.modules:
        yield
        return
    placeholder = ModuleType(_DYNAMO_UTILS)
    placeholder.is_compile_supported = _is_compile_supported
    sys.modules[_DYNAMO_UTILS] = placeholder
    try:
        yield
    finally:
        if sys.modules.get(_DYNAMO_UTILS) is placeholder:
            del sys.modules[_DYNAMO_UTILS]


def import_torchvision() -> ModuleType:
    """Import torchvision, stubbing the op schemas only when its compiled extension is unusable."""
    global EXTENSION_STUBBED
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "models"):
        return sys.modules["torchvision"]
    with _dynamo_deferred():
        try:
            import torchvision
        except RuntimeError as exc:
            if not _is_missing_extension_error(exc):
                raise
            _forget_partial_import()
            _define_op_schemas()
            EXTENSION_STUBBED = True
            import torchvision
    return torchvision


# Importing this module makes a later `import torchvision` work (docs/PIPELINE.md, "torchvision
# on a CPU-only torch").
import_torchvision()
