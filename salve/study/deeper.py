"""Edits inside the backbone (open question 3): can a deeper edit change how a concept forms?

A head edit only changes how the head combines features; the features themselves stay intact. Here
the edit goes into a residual block's output branch, along a direction ``d`` of that block's
channel space (the decoder column of an SAE fitted on :func:`pooled_activations` of the layer), so
every later layer sees the edited representation.

The edit, for suppression strength ``alpha`` and sign ``s`` (``P = I + s * alpha * d d^T``, ``d``
unit), acts on the branch output ``v`` (per position / token) as ``v' = P (v - m) + m``: centred at
``m``, so the branch's typical output keeps its component along ``d`` and only the deviation from
it is scaled (the analogue of the centred head edit in docs/METHOD.md).

- ResNet block (``conv2``/``bn2``, or ``conv3``/``bn3`` for a bottleneck): in eval mode BN is the
  per-channel affine map ``v = S (u - mu) + beta`` of the conv output ``u``, with
  ``S = diag(gamma / sqrt(running_var + eps))`` and ``mu`` the running mean. With
  ``W' = S^-1 P S W`` (over output channels; a conv bias ``b' = S^-1 P S b``) the BN output
  becomes ``P S (u - mu) + beta``, and ``beta' = beta + (I - P)(S mu - beta + m)`` absorbs the
  constant, giving exactly ``v' = P (v - m) + m``. Default ``m = beta``: the BN output at the
  running mean, so the edit leaves the mean output unchanged along ``d`` (``beta' = beta + (I-P)
  S mu``). gamma, running statistics and the shortcut are unchanged; a channel with ``gamma = 0``
  makes ``S`` singular and is refused.
- ViT encoder block: the MLP's output projection (its last ``nn.Linear``), ``W' = P W``,
  ``b' = P b + (I - P) m``. Default ``m = b`` (the output at a zero hidden state); pass the data
  mean of the MLP output (e.g. :func:`pooled_activations` of ``<block>.mlp``) to centre on data.

Not edited: the residual path. The block's output is ``relu(v' + shortcut(x))`` (ResNet) or
``x + attention + mlp'`` (ViT), so the component along ``d`` that arrives through the shortcut
survives the edit; how much of a concept the edit still removes is part of what the study
measures.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from salve.activations import batched_forward
from salve.editing import Sign, resolve_sign


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the tapped layer needs computing."""


def _pool(out: torch.Tensor, has_class_token: bool) -> torch.Tensor:
    if out.dim() == 4:  # CNN feature map [N, C, H, W]: global average, as the head's avgpool
        return out.mean(dim=(2, 3))
    if out.dim() == 3:  # tokens [N, T, D]: mean over the patch tokens (class token left out)
        return (out[:, 1:] if has_class_token else out).mean(dim=1)
    if out.dim() == 2:
        return out
    raise ValueError(f"cannot pool a layer output of shape {tuple(out.shape)}")


def _submodule(model: nn.Module, layer_name: str) -> nn.Module:
    try:
        return model.get_submodule(layer_name)
    except AttributeError as exc:
        names = [n for n, _ in model.named_children()]
        raise ValueError(
            f"model has no module {layer_name!r}; top-level modules: {', '.join(names)} "
            "(use dotted names, e.g. layer3 or encoder.layers.encoder_layer_5)"
        ) from exc


def pooled_activations(
    model: nn.Module,
    images_u8: torch.Tensor,
    layer_name: str,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    *,
    device: torch.device | None = None,
) -> torch.Tensor:
    """One vector per image [N, C] from the output of ``layer_name`` (eval mode, float32, CPU).

    CNN feature maps are averaged over space (ResNet ``layer3`` -> 256-d). ViT token sequences
    are averaged over the patch tokens, leaving out the class token: the average, like a CNN's
    global pool, describes the whole image, and at intermediate blocks the class token has not
    yet gathered it. The forward pass stops at the layer; the hook is always removed.
    """
    module = _submodule(model, layer_name)
    has_cls = hasattr(model, "class_token")
    store: dict[str, torch.Tensor] = {}

    def capture(_m: nn.Module, _inp: object, out: object) -> None:
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"{layer_name} returns {type(out).__name__}, not a tensor")
        store["out"] = out
        raise _StopForward

    def run(x: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(_StopForward):
            model(x)
        if "out" not in store:
            raise ValueError(f"{layer_name} was not called by the model's forward pass")
        return _pool(store.pop("out"), has_cls).float()

    handle = module.register_forward_hook(capture)
    try:
        return batched_forward(
            model, run, images_u8, mean, std, batch_size=batch_size, device=device, desc=layer_name
        )
    finally:
        handle.remove()


def _output_branch(block: nn.Module) -> tuple[str, nn.Module, nn.Module | None]:
    """("bn", conv, bn) for a ResNet block, ("linear", linear, None) for a ViT block."""
    for conv_name, bn_name in (("conv3", "bn3"), ("conv2", "bn2")):
        conv, bn = getattr(block, conv_name, None), getattr(block, bn_name, None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            return "bn", conv, bn
    mlp = getattr(block, "mlp", None)
    if isinstance(mlp, nn.Module):
        linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
        if linears:
            return "linear", linears[-1], None
    raise ValueError(
        f"{type(block).__name__} is not an editable residual block: expected a ResNet block "
        "(conv2/bn2 or conv3/bn3) or a ViT encoder block (mlp ending in a Linear)"
    )


def resolve_block(model: nn.Module, layer_name: str) -> nn.Module:
    """The block whose output branch is edited: the named block, or a stage's last block."""
    module = _submodule(model, layer_name)
    if isinstance(module, nn.Sequential) and len(module):
        try:
            _output_branch(module)
        except ValueError:
            module = module[-1]
    _output_branch(module)  # raises with the fix if it is not a block
    return module


def _unit64(direction: torch.Tensor, channels: int) -> torch.Tensor:
    d = torch.as_tensor(direction).detach().to("cpu", torch.float64).reshape(-1)
    if d.shape != (channels,):
        raise ValueError(
            f"direction must have {channels} entries (the block's channels), got {d.numel()}"
        )
    norm = torch.linalg.vector_norm(d)
    if not bool(norm > 0) or not bool(torch.isfinite(norm)):
        raise ValueError("direction must be finite and non-zero")
    return d / norm


def edit_block_output(
    model: nn.Module,
    layer_name: str,
    direction_c: torch.Tensor,
    alpha: float,
    sign: Sign = "suppress",
    *,
    centre_c: torch.Tensor | None = None,
) -> nn.Module:
    """A deep copy of ``model`` with the block's output branch edited: ``v' = P (v - m) + m``.

    See the module docstring for the exact identity and what is left unedited (the shortcut).
    ``layer_name`` names a block or a stage (``layer3`` -> its last block). Computed in float64
    and rounded once; ``alpha = 0`` returns an unchanged copy, bit for bit. The identity holds in
    eval mode (BN with running statistics), the mode edited models are evaluated in.
    """
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be finite and >= 0 (sign gives the direction), got {alpha}")
    s = resolve_sign(sign)
    edited = copy.deepcopy(model)
    if alpha == 0:
        return edited
    kind, layer, bn = _output_branch(resolve_block(edited, layer_name))
    channels = layer.out_channels if kind == "bn" else layer.out_features
    d = _unit64(direction_c, channels)
    sa = s * float(alpha)
    with torch.no_grad():
        if kind == "bn":
            _edit_conv_bn(layer, bn, d, sa, centre_c)
        else:
            _edit_linear(layer, d, sa, centre_c)
    return edited


def _centre64(centre_c: torch.Tensor | None, default: torch.Tensor, channels: int) -> torch.Tensor:
    if centre_c is None:
        return default
    m = torch.as_tensor(centre_c).detach().to("cpu", torch.float64).reshape(-1)
    if m.shape != (channels,) or not bool(torch.isfinite(m).all()):
        raise ValueError(f"centre_c must be {channels} finite values, got shape {tuple(m.shape)}")
    return m


def _edit_conv_bn(
    conv: nn.Conv2d, bn: nn.BatchNorm2d, d: torch.Tensor, sa: float, centre_c: torch.Tensor | None
) -> None:
    if bn.running_mean is None or bn.running_var is None or not bn.affine:
        raise ValueError("the block's BatchNorm needs running statistics and affine parameters")
    f64 = dict(device="cpu", dtype=torch.float64)
    gamma, beta = bn.weight.to(**f64), bn.bias.to(**f64)
    scale = gamma / torch.sqrt(bn.running_var.to(**f64) + bn.eps)
    if bool((scale == 0).any()):
        bad = (scale == 0).nonzero()[:, 0].tolist()[:5]
        raise ValueError(
            f"bn gamma is 0 in channel(s) {bad}: S^-1 P S is undefined; edit another block"
        )
    m = _centre64(centre_c, beta, beta.numel())
    # S^-1 P S = I + sa * (d / S)(S d)^T, applied over the output channels of the conv.
    left, right = d / scale, d * scale
    w = conv.weight.to(**f64)
    inner = torch.tensordot(right, w, dims=1)  # (S d)^T W over output channels: [C_in, kh, kw]
    w_new = w + sa * left.view(-1, *([1] * inner.dim())) * inner.unsqueeze(0)
    shift = -sa * d * torch.dot(d, scale * bn.running_mean.to(**f64) - beta + m)  # (I - P)(...)
    conv.weight.copy_(w_new.to(conv.weight.dtype))
    if conv.bias is not None:
        b = conv.bias.to(**f64)
        conv.bias.copy_((b + sa * left * torch.dot(right, b)).to(conv.bias.dtype))
    bn.bias.copy_((beta + shift).to(bn.bias.dtype))


def _edit_linear(
    linear: nn.Linear, d: torch.Tensor, sa: float, centre_c: torch.Tensor | None
) -> None:
    f64 = dict(device="cpu", dtype=torch.float64)
    w = linear.weight.to(**f64)
    linear.weight.copy_((w + sa * torch.outer(d, d @ w)).to(linear.weight.dtype))
    if linear.bias is not None:
        b = linear.bias.to(**f64)
        m = _centre64(centre_c, b, b.numel())
        # P b + (I - P) m = b + sa d d^T (b - m)
        linear.bias.copy_((b + sa * d * torch.dot(d, b - m)).to(linear.bias.dtype))
    elif centre_c is not None:
        raise ValueError("centre_c needs a Linear with a bias to absorb the constant")


def edited_accuracy(
    model: nn.Module,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    *,
    num_classes: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Per-class accuracy [K] (float64 fractions; NaN for a class without samples) of real
    forward passes, for comparing a backbone edit with a head edit (e.g. via
    :func:`salve.editing.selectivity`)."""
    labels = torch.as_tensor(labels).to(torch.int64).reshape(-1)
    if labels.shape[0] != images_u8.shape[0]:
        raise ValueError("labels and images disagree on N")
    k = int(labels.max()) + 1 if num_classes is None and labels.numel() else int(num_classes or 0)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"labels must lie in [0, {k})")
    preds = batched_forward(
        model,
        lambda x: model(x).argmax(dim=1),
        images_u8,
        mean,
        std,
        batch_size=batch_size,
        device=device,
        desc="edited_accuracy",
    ).reshape(-1)
    correct = (preds == labels).to(torch.float64)
    hits = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, correct)
    return hits / torch.bincount(labels, minlength=k).to(torch.float64)
