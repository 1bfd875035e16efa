"""Any torchvision classifier with a final linear head: build it, find the head, split at its input.

The head is found generically: the last ``nn.Linear`` in the module tree, accepted only when a dry
forward shows that its output *is* the model's output (so nothing runs after it). ``penultimate``
captures the head's exact input with a forward pre-hook, so ``head_of(model)(penultimate(model,
x)) == model(x)`` for every architecture and an edit of the head is exact on cached activations.
Call it in eval mode: some models (EfficientNet, MobileNet) apply dropout right before the head.

Checkpoints are a plain torchvision state dict (safetensors) plus a JSON sidecar naming the
architecture and the head's module path, so ``load_checkpoint`` rebuilds any architecture and the
weights load strictly into ``torchvision.models.get_model(arch)`` with that head replaced.

Family-specific knowledge is kept to two documented spots: ``_build_for_size`` (a ViT is built
for its image size: its position embedding depends on it) and ``_fit_position_embedding`` (a
ViT's position embedding is interpolated when weights come from another image size).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from salve.errors import SalveUserError
from salve.tv import import_torchvision

# The builder name a model was made from; set by build_model (a module does not know its name).
_ARCH_ATTR = "_salve_arch"
# The sidecar format of a steered model (salve.steering): the classifier plus steering tensors.
STEERED_FORMAT = "salve-steered-classifier"


class WeightsUnavailableError(SalveUserError, RuntimeError):
    """Pretrained weights were asked for but cannot be obtained."""


class WeightsFileError(SalveUserError, ValueError):
    """A finetune.weights file is missing, unreadable or does not fit the architecture/classes."""


def classifier_names() -> list[str]:
    """Every classification model torchvision can build by name."""
    tv = import_torchvision()
    return sorted(tv.models.list_models(module=tv.models))


def _unknown_arch_error(name: str) -> ValueError:
    names = classifier_names()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ValueError(
        f"unknown architecture {name!r}: not a torchvision classification model.{hint} "
        f"Choose one of torchvision.models.list_models(module=torchvision.models), e.g. "
        f"resnet18, resnet50, mobilenet_v3_small, convnext_tiny, efficientnet_b0, vit_b_16, "
        f"swin_t ({len(names)} in all)."
    )


@dataclass(frozen=True)
class ArchSpec:
    """What an architecture looks like at an image size, learnt from a cheap skeleton."""

    arch: str
    image_size: int
    head: str  # module path of the final linear head, e.g. "fc", "classifier.3", "heads.head"
    head_in: int
    head_out: int
    shapes: dict[str, tuple[int, ...]]  # state-dict key -> shape, with the original head
    builder_kwargs: dict[str, int]
    modules: tuple[str, ...] = ()  # every submodule's name, in definition order ("" left out)

    def head_keys(self) -> tuple[str, ...]:
        return tuple(k for k in self.shapes if k.rpartition(".")[0] == self.head)


def _skeleton(arch: str, **kwargs) -> nn.Module:
    """The model built on the CPU, its random initialisation outside the global RNG.

    Not on the meta device: a meta tensor's initialisers run torch's Python reference kernels,
    whose first call imports the compiler stack (torch._dynamo, sympy), measured at 6.5 s on a
    2-core machine against 0.2 s to initialise a ResNet-18 on the CPU (1 s for a ViT-B/16)."""
    tv = import_torchvision()
    with torch.random.fork_rng(devices=[]):
        return tv.models.get_model(arch, **kwargs)


def last_linear(model: nn.Module, label: str = "") -> str:
    """Module path of the last ``nn.Linear`` in the module tree; ValueError if there is none."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(
            f"{label or type(model).__name__} has no nn.Linear layer, so it has no linear "
            "classification head to edit. Choose a model whose classifier ends in a linear layer "
            "(resnet18, mobilenet_v3_small, convnext_tiny, efficientnet_b0, vit_b_16, swin_t, ...)."
        )
    return names[-1]


def _size_error(arch: str, image_size: int, exc: Exception) -> ValueError:
    return ValueError(
        f"{arch} cannot take {image_size} px images ({type(exc).__name__}: {str(exc)[:200]}). "
        "Change data.image_size (a ViT needs a multiple of its patch size) or choose another "
        "architecture."
    )


def _build_for_size(arch: str, image_size: int) -> tuple[nn.Module, dict[str, int]]:
    """The skeleton and the builder arguments that depend on the image size.

    ViT builders take ``image_size``, size their position embedding by it and record it; every
    other family takes any size as built, and refuses the argument (a TypeError before anything
    is built) or ignores it (MobileNet, ConvNeXt: ``**kwargs``). One build either way (a ViT-B/16
    costs about 1.3 s on 2 cores)."""
    try:
        model = _skeleton(arch, image_size=image_size)
    except TypeError as exc:
        if "image_size" not in str(exc):
            raise _size_error(arch, image_size, exc) from exc
        return _skeleton(arch), {}
    except Exception as exc:  # builders assert on sizes they cannot take
        raise _size_error(arch, image_size, exc) from exc
    recorded = getattr(model, "image_size", None) == image_size
    return model, ({"image_size": image_size} if recorded else {})


# arch_spec's results by (arch, image_size): a process meets few of them.
_SPECS: dict[tuple[str, int], ArchSpec] = {}


def arch_spec(arch: str, image_size: int = 224) -> ArchSpec:
    """Validate ``arch`` at ``image_size`` with a dry forward on a skeleton, and describe it."""
    key = (arch, image_size)
    if key not in _SPECS:
        _SPECS[key] = _describe(arch, image_size)[0]
    return _SPECS[key]


def skeleton(arch: str, image_size: int = 224) -> nn.Module:
    """A randomly initialised ``arch`` built for ``image_size`` (eval mode, original head), for
    checks of its structure (module names, feature maps); the global RNG is untouched. The first
    call for an architecture and size validates it as ``arch_spec`` does, from the same build."""
    key = (arch, image_size)
    if key in _SPECS:
        return _skeleton(arch, **_SPECS[key].builder_kwargs).eval()
    spec, model = _describe(arch, image_size)
    _SPECS[key] = spec
    return model


def _describe(arch: str, image_size: int) -> tuple[ArchSpec, nn.Module]:
    """The spec and the skeleton it was learnt from (eval mode)."""
    if arch not in classifier_names():
        raise _unknown_arch_error(arch)
    skeleton, kwargs = _build_for_size(arch, image_size)
    head = last_linear(skeleton, f"{arch} ({type(skeleton).__name__})")
    seen: list[torch.Tensor] = []
    grab = skeleton.get_submodule(head).register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            logits = skeleton.eval()(torch.zeros(1, 3, image_size, image_size))
    except Exception as exc:  # shape errors surface as several types; re-raise with the fix
        raise _size_error(arch, image_size, exc) from exc
    finally:
        grab.remove()
    if len(seen) != 1 or seen[0] is not logits:
        raise ValueError(
            f"{arch}: its last linear layer {head!r} is not the final step of the forward pass "
            "(something runs after it, or it runs more than once), so it cannot be edited as a "
            "linear head. Choose a model whose classifier ends in a linear layer."
        )
    linear = skeleton.get_submodule(head)
    spec = ArchSpec(
        arch=arch,
        image_size=image_size,
        head=head,
        head_in=linear.in_features,
        head_out=linear.out_features,
        shapes={k: tuple(v.shape) for k, v in skeleton.state_dict().items()},
        builder_kwargs=kwargs,
        modules=tuple(name for name, _ in skeleton.named_modules() if name),
    )
    return spec, skeleton


def check_architecture(name: str, *, image_size: int = 224) -> None:
    """Pre-flight check: ``name`` is a torchvision classifier with a final linear head that takes
    ``image_size`` px images, by a dry forward on a skeleton; one clear ValueError."""
    arch_spec(name, image_size)


def build_model(
    arch: str,
    num_classes: int,
    *,
    image_size: int = 224,
    weights: str = "none",
    keep_head: bool = False,
) -> nn.Module:
    """A plain torchvision model whose head has ``num_classes`` outputs.

    weights: "none" (random init), "imagenet" (torchvision's weights API; needs the network or a
    filled torch hub cache), or a path to a safetensors state dict. With ``keep_head`` the file's
    head must already have ``num_classes`` outputs and everything loads strictly (the model is
    used as it is); otherwise the file's head, if any, is dropped and a fresh one trained.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if keep_head and weights in ("", "none", "imagenet"):
        raise ValueError(
            f"keep_head needs a weights file with a {num_classes}-class head, got weights="
            f"{weights!r}; a fresh or ImageNet head must be trained (finetune.epochs > 0)"
        )
    spec = arch_spec(arch, image_size)
    tv = import_torchvision()
    model = tv.models.get_model(arch, **spec.builder_kwargs)
    if weights == "imagenet":
        _load_imagenet(model, spec)
    elif weights not in ("", "none"):
        _load_weights_file(model, spec, weights, num_classes, keep_head=keep_head)
        if keep_head:
            setattr(model, _ARCH_ATTR, arch)
            return model
    _replace_head(model, spec.head, num_classes)
    setattr(model, _ARCH_ATTR, arch)
    return model


def _fit_position_embedding(state: dict, spec: ArchSpec) -> dict:
    """A ViT's position embedding, interpolated to this image size (other families: unchanged)."""
    key = "encoder.pos_embedding"
    if key in state and key in spec.shapes and tuple(state[key].shape) != spec.shapes[key]:
        tv = import_torchvision()
        patch = spec.shapes["conv_proj.weight"][-1]  # [D, 3, patch, patch]
        state = tv.models.vision_transformer.interpolate_embeddings(
            spec.image_size, patch, state, reset_heads=False
        )
    return state


def _load_imagenet(model: nn.Module, spec: ArchSpec) -> None:
    tv = import_torchvision()
    enum_value = tv.models.get_model_weights(spec.arch).DEFAULT
    try:
        state = enum_value.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # network errors surface as many types; re-raise with the fix
        raise WeightsUnavailableError(
            f"could not load ImageNet weights for {spec.arch} ({type(exc).__name__}: {exc}). "
            "This machine may be offline: set finetune.weights to 'none', or to a local "
            ".safetensors file with the backbone weights."
        ) from exc
    model.load_state_dict(_fit_position_embedding(state, spec))


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    if not path.is_file():
        raise WeightsFileError(
            f"finetune.weights: {path} does not exist. Put the .safetensors state dict under "
            "weights/ (or link it there) and name it in finetune.weights."
        )
    try:
        with safe_open(str(path), "pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error type and OSError
        raise WeightsFileError(
            f"finetune.weights: {path} is not a readable safetensors file ({str(exc)[:200]}). "
            "Save the model with safetensors.torch.save_file(model.state_dict(), path)."
        ) from exc


def check_weights_file(
    path: str | Path,
    arch: str,
    num_classes: int,
    *,
    keep_head: bool,
    image_size: int = 224,
) -> ArchSpec:
    """Check a weights file against the architecture from its header only (no tensor data).

    keep_head=True: the file must be a full state dict whose head has ``num_classes`` outputs
    (the pipeline explains it as is). keep_head=False: the head, if present, is ignored; every
    other key must be there with its shape (a ViT's position embedding may be for another image
    size: it is interpolated). Raises one WeightsFileError naming the problem and the fix.
    """
    path = Path(path)
    shapes = _file_shapes(path)
    spec = arch_spec(arch, image_size)
    head_keys = set(spec.head_keys())
    expected = {k: v for k, v in spec.shapes.items() if k not in head_keys}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in spec.shapes]
    if missing or unexpected:
        raise WeightsFileError(
            f"finetune.weights: {path} does not match {arch}: {len(missing)} keys missing "
            f"(e.g. {missing[:4]}), {len(unexpected)} unexpected (e.g. {unexpected[:4]}). "
            f"Give a state dict of torchvision's {arch}, or set finetune.arch to the model the "
            "file was saved from."
        )
    resizable = set() if keep_head else {"encoder.pos_embedding"}
    wrong = [
        f"{k} {list(shapes[k])} (expected {list(v)})"
        for k, v in expected.items()
        if shapes[k] != v and k not in resizable
    ]
    if wrong:
        raise WeightsFileError(
            f"finetune.weights: {path} has tensors of the wrong shape for {arch} at "
            f"{image_size} px: {'; '.join(wrong[:3])}. It is another variant of the model, or "
            "was trained at another image size (set data.image_size to match)."
        )
    if keep_head:
        absent = sorted(head_keys - set(shapes))
        if absent:
            raise WeightsFileError(
                f"finetune.weights: {path} has no complete head ({', '.join(absent)} missing), "
                "so it cannot be explained as it is. Set finetune.epochs > 0 to train a new head "
                "on it."
            )
        k_file = shapes[f"{spec.head}.weight"][0]
        if k_file != num_classes:
            raise WeightsFileError(
                f"finetune.weights: {path} has a head ({spec.head}) with {k_file} outputs, but "
                f"the data has {num_classes} classes. Use the data the model was trained on "
                f"(its {k_file} classes), or set finetune.epochs > 0 to train a new "
                f"{num_classes}-class head."
            )
    return spec


def read_head(path: str | Path, arch: str, image_size: int = 224) -> dict[str, torch.Tensor]:
    """The head's tensors (``<head>.weight``, ``<head>.bias`` where present) from a safetensors
    state dict, read alone: the rest of the file is not loaded. Check the file first
    (``check_weights_file``)."""
    from safetensors import safe_open

    spec = arch_spec(arch, image_size)
    with safe_open(str(path), "pt") as fh:
        present = set(fh.keys())
        return {key: fh.get_tensor(key) for key in spec.head_keys() if key in present}


def _load_weights_file(
    model: nn.Module, spec: ArchSpec, path: str, num_classes: int, *, keep_head: bool
) -> None:
    from salve.io import ArtifactError, load_tensors

    check_weights_file(
        path, spec.arch, num_classes, keep_head=keep_head, image_size=spec.image_size
    )
    try:
        state = load_tensors(path)
    except ArtifactError as exc:
        raise WeightsFileError(f"finetune.weights: {exc}") from exc
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsFileError(
            f"finetune.weights: {path} holds NaN or infinite values (in {bad[:3]}). The file "
            "is damaged or was saved from a diverged run: export the model again."
        )
    if keep_head:
        _replace_head(model, spec.head, num_classes)
        model.load_state_dict(state, strict=True)
        return
    head_keys = set(spec.head_keys())
    backbone = {k: v for k, v in state.items() if k not in head_keys}
    missing, unexpected = model.load_state_dict(
        _fit_position_embedding(backbone, spec), strict=False
    )
    if set(missing) - head_keys or unexpected:  # check_weights_file makes this unreachable
        raise WeightsFileError(f"finetune.weights: {path} does not match {spec.arch}")


def _replace_head(model: nn.Module, path: str, num_classes: int) -> None:
    old = model.get_submodule(path)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    model.set_submodule(path, new.to(device=old.weight.device, dtype=old.weight.dtype))


def head_path(model: nn.Module) -> str:
    """Module path of the classification head (the last linear layer)."""
    return last_linear(model)


def head_of(model: nn.Module) -> nn.Linear:
    return model.get_submodule(head_path(model))


def arch_of(model: nn.Module) -> str:
    """The torchvision builder name the model was made from (by ``build_model``)."""
    arch = getattr(model, _ARCH_ATTR, None)
    if arch is None:
        raise ValueError(
            f"this {type(model).__name__} was not made by salve.models.build_model, so its "
            "architecture name is unknown; pass it in the sidecar as 'architecture'."
        )
    return arch


def penultimate(model: nn.Module, images_nchw: torch.Tensor) -> torch.Tensor:
    """The exact input of the classification head, [N, M] (captured by a pre-hook on the head)."""
    captured: list[torch.Tensor] = []
    handle = head_of(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        model(images_nchw)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the head ran {len(captured)} times in one forward pass, expected 1")
    acts = captured[0]
    if acts.ndim != 2:
        raise ValueError(
            f"the head reads a {acts.ndim}-D tensor {tuple(acts.shape)}, expected [N, M]"
        )
    return acts


def feature_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda images: penultimate(model, images)


def sidecar_path(checkpoint: str | Path) -> Path:
    return Path(checkpoint).with_suffix(".json")


def save_checkpoint(path: str | Path, model: nn.Module, sidecar: dict) -> None:
    """Weights as safetensors (a plain torchvision state dict) plus a JSON sidecar that records
    the architecture and the head's module path (the model's own values win)."""
    from salve.io import save_tensors, write_json

    arch = getattr(model, _ARCH_ATTR, None) or sidecar.get("architecture")
    if arch is None:
        arch_of(model)  # raises the explanatory error
    sidecar = {"format": "salve-classifier"} | sidecar | {"architecture": arch}
    sidecar["head"] = head_path(model)
    save_tensors(path, model.state_dict(), metadata={"architecture": arch})
    write_json(sidecar_path(path), sidecar)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the plain torchvision model from a checkpoint and its sidecar (eval mode)."""
    from salve.io import ArtifactError, load_tensors, read_json

    sidecar = read_json(sidecar_path(path))
    if sidecar.get("format") == STEERED_FORMAT:
        raise ArtifactError(
            f"{path} is a steered model (the classifier plus activation steering), not a plain "
            "torchvision checkpoint: load it with salve.load_classifier."
        )
    return classifier_from_state(path, sidecar, load_tensors(path)), sidecar


def classifier_from_state(path: str | Path, sidecar: dict, state: dict) -> nn.Module:
    """The plain torchvision model its sidecar describes, holding exactly ``state`` (eval
    mode); ``path`` names the file in errors."""
    from salve.io import ArtifactError

    for key in ("architecture", "classes", "image_size"):
        if key not in sidecar:
            raise ArtifactError(f"{sidecar_path(path)}: missing key {key!r}; rerun finetune.")
    arch, num_classes = sidecar["architecture"], len(sidecar["classes"])
    spec = arch_spec(arch, int(sidecar["image_size"]))
    recorded = sidecar.get("head")
    if recorded is not None and recorded != spec.head:
        raise ArtifactError(
            f"{sidecar_path(path)}: records head {recorded!r}, but {arch} has its head at "
            f"{spec.head!r} (another torchvision version?). Rerun finetune."
        )
    try:
        model = _model_from_state(spec, num_classes, state)
    except RuntimeError as exc:
        raise ArtifactError(
            f"{path}: weights do not fit a {arch} with {num_classes} classes "
            f"({str(exc)[:200]}). Rerun finetune."
        ) from exc
    return model.eval()


def _model_from_state(spec: ArchSpec, num_classes: int, state: dict) -> nn.Module:
    """The model holding exactly ``state`` (strict); the global RNG is left untouched."""
    model = _skeleton(spec.arch, **spec.builder_kwargs)
    with torch.random.fork_rng(devices=[]):  # the new head's init is overwritten just below
        _replace_head(model, spec.head, num_classes)
    model.load_state_dict(state, strict=True)
    setattr(model, _ARCH_ATTR, spec.arch)
    return model


def load_classifier(path: str | Path) -> nn.Module:
    """A saved checkpoint as a module in eval mode: a fine-tuned or head-edited one as a plain
    torchvision model; a steered one (``edit.mode: steer``) as a ``salve.steering.
    SteeredClassifier`` (backbone -> steering -> head), on the CPU: move it with ``.to``."""
    from salve.io import read_json

    if read_json(sidecar_path(path)).get("format") == STEERED_FORMAT:
        # Imported by name: no pipeline stage loads a steered model, so salve.steering (and
        # the SAE code it needs) is not a code dependency of every stage (tasks/deps.py).
        steering = importlib.import_module("salve.steering")
        return steering.load_steered(path)[0]
    return load_checkpoint(path)[0]
