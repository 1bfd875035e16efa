"""salve.tv: torchvision imports on any install; the stub fallback only for the missing-op error."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch

import salve.tv as tvmod
from salve.tv import import_torchvision

MISSING_OP = RuntimeError("operator torchvision::nms does not exist")


def test_import_torchvision_returns_a_working_module() -> None:
    tv = import_torchvision()
    assert isinstance(tv, ModuleType) and tv.__name__ == "torchvision"
    assert import_torchvision() is tv is sys.modules["torchvision"]
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    img = torch.arange(12, dtype=torch.uint8).reshape(1, 3, 4)
    assert torch.equal(tv.transforms.functional.hflip(img), img.flip(-1))


def test_extension_stubbed_flag_matches_has_ops() -> None:
    tv = import_torchvision()
    assert (not tv.extension._has_ops()) == tvmod.EXTENSION_STUBBED
    if tvmod.EXTENSION_STUBBED:
        # Only schemas were defined: the ops exist but have no kernel.
        assert hasattr(torch.ops.torchvision, "nms") and hasattr(torch.ops.torchvision, "qnms")
        with pytest.raises((NotImplementedError, RuntimeError)):
            torch.ops.torchvision.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    else:
        boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
        keep = tv.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
        assert keep.tolist() == [0, 2]


def test_plain_import_error_is_classified_as_the_stub_case() -> None:
    """In a fresh interpreter, a bare `import torchvision` fails exactly when the stub is needed,
    and with an error that `_is_missing_extension_error` recognises."""
    code = (
        "import json\n"
        "try:\n"
        "    import torchvision\n"
        "    print(json.dumps({'ok': True}))\n"
        "except RuntimeError as exc:\n"
        "    print(json.dumps({'ok': False, 'error': str(exc)}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    import_torchvision()
    assert result["ok"] is (not tvmod.EXTENSION_STUBBED)
    if not result["ok"]:
        assert tvmod._is_missing_extension_error(RuntimeError(result["error"]))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("operator torchvision::nms does not exist", True),
        ("operator torchvision::qnms does not exist", True),
        ("operator aten::nms does not exist", False),
        ("torchvision::nms: CUDA error: no kernel image is available", False),
        ("libcudart.so.13: cannot open shared object file: does not exist", False),
        ("", False),
    ],
)
def test_is_missing_extension_error(text: str, expected: bool) -> None:
    assert tvmod._is_missing_extension_error(RuntimeError(text)) is expected


def _fake_import(monkeypatch, errors: list[BaseException]) -> list[str]:
    """Make `import torchvision` raise the given errors in turn, then give the loaded module
    (never re-executing torchvision, whose op registrations must happen once per process)."""
    real_import = builtins.__import__
    loaded = sys.modules["torchvision"]
    calls: list[str] = []

    def fake(name, *args, **kwargs):
        if name == "torchvision":
            calls.append(name)
            if errors:
                raise errors.pop(0)
            return loaded
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "torchvision")  # restored after the test
    monkeypatch.setattr(builtins, "__import__", fake)
    monkeypatch.setattr(tvmod, "EXTENSION_STUBBED", tvmod.EXTENSION_STUBBED)
    return calls


def test_other_runtime_error_is_reraised(monkeypatch) -> None:
    import_torchvision()
    stubbed = []
    monkeypatch.setattr(tvmod, "_define_op_schemas", lambda: stubbed.append("define"))
    monkeypatch.setattr(tvmod, "_forget_partial_import", lambda: stubbed.append("forget"))
    before = tvmod.EXTENSION_STUBBED
    calls = _fake_import(monkeypatch, [RuntimeError("CUDA driver version is insufficient")])
    with pytest.raises(RuntimeError, match="CUDA driver version is insufficient"):
        import_torchvision()
    assert calls == ["torchvision"] and stubbed == []
    assert before == tvmod.EXTENSION_STUBBED


def test_non_runtime_error_is_not_swallowed(monkeypatch) -> None:
    import_torchvision()
    monkeypatch.setattr(tvmod, "_define_op_schemas", lambda: pytest.fail("must not stub"))
    _fake_import(monkeypatch, [ImportError("No module named 'torchvision'")])
    with pytest.raises(ImportError, match="No module named"):
        import_torchvision()


def test_missing_op_error_takes_the_fallback(monkeypatch) -> None:
    real = import_torchvision()
    steps: list[str] = []
    monkeypatch.setattr(tvmod, "_define_op_schemas", lambda: steps.append("define"))
    monkeypatch.setattr(tvmod, "_forget_partial_import", lambda: steps.append("forget"))
    calls = _fake_import(monkeypatch, [MISSING_OP])
    monkeypatch.setattr(tvmod, "EXTENSION_STUBBED", False)
    tv = import_torchvision()
    assert tv is real
    assert steps == ["forget", "define"] and calls == ["torchvision", "torchvision"]
    assert tvmod.EXTENSION_STUBBED is True


def test_partially_imported_module_is_not_returned(monkeypatch) -> None:
    """A half-initialised `torchvision` left in sys.modules (no `models`) triggers a real import."""
    real = import_torchvision()
    monkeypatch.setitem(sys.modules, "torchvision", ModuleType("torchvision"))
    seen = []
    real_import = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "torchvision":
            seen.append(name)
            return real
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    assert import_torchvision() is real and seen == ["torchvision"]


def test_forget_partial_import_removes_only_torchvision_modules(monkeypatch) -> None:
    fake_modules = {
        "torchvision": 1,
        "torchvision.ops": 2,
        "torchvision._meta_registrations": 3,
        "torchvision_extra": 4,
        "foo.torchvision": 5,
        "torch": 6,
    }
    monkeypatch.setattr(tvmod, "sys", SimpleNamespace(modules=fake_modules))
    tvmod._forget_partial_import()
    assert fake_modules == {"torchvision_extra": 4, "foo.torchvision": 5, "torch": 6}


def test_loading_a_checkpoint_does_not_import_the_compiler_stack(tmp_path) -> None:
    """torch._dynamo (6.5 s of every process here) stays unloaded through seeding with
    deterministic kernels, torchvision's import, an architecture check and a checkpoint load;
    roi_align's deferred name and a later real import of torch._dynamo still work."""
    script = f"""
import sys
import torch
from salve.models import arch_spec, build_model, load_checkpoint, save_checkpoint
from salve.runtime import seed_everything
seed_everything(0, num_threads=1)
assert torch.are_deterministic_algorithms_enabled()
assert torch.is_deterministic_algorithms_warn_only_enabled()
arch_spec("resnet18", 64)
path = {str(tmp_path / "m.safetensors")!r}
save_checkpoint(path, build_model("resnet18", 3), {{"classes": list("abc"), "image_size": 64}})
load_checkpoint(path)
loaded = [m for m in sys.modules if m.startswith("torch._dynamo")]
from torchvision.ops import roi_align as module_of_roi_align
import importlib
ops = importlib.import_module("torchvision.ops.roi_align")
supported = ops.is_compile_supported("cpu")
import torch._dynamo.utils as real
print(loaded, type(supported).__name__, real.is_compile_supported is not ops.is_compile_supported)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    ).stdout.split()
    assert out == ["[]", "bool", "True"]
