"""Activation steering: the second control technique, beside the permanent head edits.

The edits in :mod:`salve.editing` change the head's weights for every input alike. Steering
changes the head's *input*, per sample, by the amount the SAE reads in it. At the SAE's hook
point (the head input ``a``), for latent ``l`` with code ``z_l(a) = encode(a)[l]`` (the SAE's own
encode rule, whatever its kind) and decoder column ``c_l = W_dec[:, l]``::

    a' = a + (g - 1) * z_l(a) * c_l,     g = max(0, 1 + s * alpha)   (s = -1 suppress, +1 enhance)
    logits' = head(a')

With ``a = W_dec z + b_dec + e`` (``e`` the SAE's reconstruction error) this is
``a' = W_dec z' + b_dec + e`` where ``z'`` is ``z`` with ``z_l`` multiplied by ``g``: alpha = 1
with s = -1 (g = 0) removes the latent's share of the reconstruction and keeps the error and
every other latent's share as they were. Suppression saturates at alpha = 1 (g cannot go below
0); enhancement grows without bound. Clamping sets the code instead: ``a' = a + (v - z_l(a)) c_l``
(``v = 0`` is the same ablation; ``v`` a class mean moves every sample to it).

Several latents compose in order: each step encodes the activation the previous step left, so
``[Steer(l1), Steer(l2)]`` is ``steer_l2(steer_l1(a))``.

Re-encoding ``a'`` does *not* in general give ``z_l(a') = 0`` after an ablation: the
pre-activation becomes ``pre_l (1 - W_enc[l] . c_l)``, zero only for a latent whose encoder row
and decoder column satisfy ``W_enc[l] . c_l = 1``; and under top-k the other latents'
pre-activations move by ``-z_l W_enc[j] . c_l``, so a latent outside the top k can enter it.
The rule is stated on the codes of the input, as above.

Exactness: a step with ``g == 1`` (alpha = 0) and no clamp is skipped, not added as zeros, so
alpha = 0 returns the input tensor itself and the steered classifier's logits are the
original's bit for bit.

Because the head is linear, ``head(a') = head(a) + (g - 1) z_l(a) (W c_l)``: one latent's sweep
over alpha needs its codes once (:func:`steered_logits`, :func:`steered_accuracy_curves`), all
from cached activations.

The shipped model (:class:`SteeredClassifier`, :func:`save_steered`, :func:`load_steered`): the
base classifier's state dict plus, under ``steer.``, what the rule needs of the SAE: the encoder
rows, biases and thresholds that the steered latents' codes depend on, ``b_dec`` (the encoder
reads ``a - b_dec``), and the steered latents' decoder columns. For ``linear``, ``relu`` and
``jumprelu`` a latent's code depends on its own encoder row only; ``topk`` selects among all
latents, so every encoder row is kept; ``batchtopk`` is kept whole too (its class refuses fewer
latents than k, although its inference rule is per latent). The encoder is rebuilt as an SAE of
the recorded kind, so the codes come from that kind's own ``encode``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from salve.head_rules import Sign, resolve_sign
from salve.models import STEERED_FORMAT, arch_of, arch_spec, classifier_from_state, head_path
from salve.sae import SparseAutoencoder, build_sae

F64 = torch.float64
TENSOR_PREFIX = "steer."
COLUMNS_TENSOR = "columns"
# Kinds whose code of one latent depends on that latent's encoder row (and threshold) alone.
ROW_WISE_KINDS = ("linear", "relu", "jumprelu")
_CHUNK_BUDGET = 1 << 22  # elements of the [A, n, K] logit block per chunk over samples


def steer_gain(alpha: float, sign: Sign) -> float:
    """``g = max(0, 1 + s * alpha)``; exactly 1.0 at alpha = 0."""
    s = resolve_sign(sign)
    a = float(alpha)
    if not math.isfinite(a) or a < 0:
        raise ValueError(f"alpha must be finite and >= 0 (use sign for the direction), got {alpha}")
    return max(0.0, 1.0 + s * a)


@dataclass(frozen=True)
class Steer:
    """One step: scale latent ``latent``'s code by ``g = max(0, 1 + s alpha)``, or, with
    ``clamp``, set it to that value (alpha and sign are then unused)."""

    latent: int
    alpha: float = 1.0
    sign: Sign = "suppress"
    clamp: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.latent, bool) or int(self.latent) != self.latent or self.latent < 0:
            raise ValueError(f"latent must be an index >= 0, got {self.latent!r}")
        steer_gain(self.alpha, self.sign)  # validates alpha and sign
        if self.clamp is not None and not math.isfinite(float(self.clamp)):
            raise ValueError(f"clamp must be finite, got {self.clamp!r}")

    @property
    def gain(self) -> float:
        return steer_gain(self.alpha, self.sign)

    @property
    def is_identity(self) -> bool:
        """True for a step that changes nothing (g == 1, no clamp): it is skipped."""
        return self.clamp is None and self.gain == 1.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"latent": int(self.latent)}
        if self.clamp is not None:
            return out | {"clamp": float(self.clamp)}
        sign = {-1: "suppress", 1: "enhance"}[resolve_sign(self.sign)]
        return out | {"alpha": float(self.alpha), "sign": sign, "gain": self.gain}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> Steer:
        if "clamp" in d:
            return Steer(int(d["latent"]), clamp=float(d["clamp"]))
        return Steer(int(d["latent"]), float(d["alpha"]), str(d["sign"]))


def _as_steers(steers: Steer | Sequence[Steer]) -> tuple[Steer, ...]:
    out = (steers,) if isinstance(steers, Steer) else tuple(steers)
    if not all(isinstance(s, Steer) for s in out):
        raise TypeError("steers must be Steer objects")
    return out


def encoder_rows(sae: SparseAutoencoder, latents: Sequence[int]) -> list[int]:
    """The SAE latents whose encoder rows the codes of ``latents`` depend on, in order."""
    for latent in latents:
        if not 0 <= int(latent) < sae.d_latent:
            raise ValueError(f"latent {latent} is out of range: the SAE has {sae.d_latent}")
    if sae.kind in ROW_WISE_KINDS:
        return list(dict.fromkeys(int(latent) for latent in latents))
    return list(range(sae.d_latent))


def _reduced_sae(sae: SparseAutoencoder, rows: Sequence[int]) -> SparseAutoencoder:
    """An SAE of the same kind over ``rows`` only (same dtype and device), in eval mode. Its
    codes equal the full SAE's codes of those latents; its decoder weight is unused (zeros)."""
    full = sae.d_latent
    part = build_sae(sae.kind, sae.d_in, len(rows), k=int(getattr(sae, "k", 0)))
    part = part.to(device=sae.b_dec.device, dtype=sae.b_dec.dtype)
    index = torch.tensor(list(rows), dtype=torch.int64, device=sae.b_dec.device)
    state = {}
    for name, t in sae.state_dict().items():
        t = t.detach()
        if name == "decoder.weight":
            state[name] = torch.zeros_like(part.decoder.weight)
        elif name == "decoder.bias":
            state[name] = t.clone()
        elif t.dim() >= 1 and t.shape[0] == full:  # encoder rows, per-latent thresholds
            state[name] = t.index_select(0, index).clone()
        else:  # shared statistics (a batchtopk threshold)
            state[name] = t.clone()
    part.load_state_dict(state)
    part.input_scale = sae.input_scale
    return part.eval()


class LatentSteer(nn.Module):
    """``a -> a'`` on the head input [N, M]: the steps in order, each by the rule above.

    Holds an SAE of the recorded kind over the encoder rows the steps need (``sae``; always in
    eval mode, so a batch top-k SAE uses its saved threshold) and the steered latents' decoder
    columns (``columns`` [M, F], one per step). Device-agnostic: move it with ``.to``.
    """

    def __init__(
        self,
        sae_part: SparseAutoencoder,
        rows: Sequence[int],
        columns_mf: torch.Tensor,
        steers: Sequence[Steer],
    ) -> None:
        super().__init__()
        self.steers = _as_steers(steers)
        self.rows = tuple(int(r) for r in rows)
        if len(self.rows) != sae_part.d_latent:
            raise ValueError("rows must name every latent of the reduced SAE")
        missing = [s.latent for s in self.steers if s.latent not in self.rows]
        if missing:
            raise ValueError(f"the reduced SAE lacks the encoder rows of latents {missing}")
        if tuple(columns_mf.shape) != (sae_part.d_in, len(self.steers)):
            raise ValueError(
                f"columns must be [M={sae_part.d_in}, F={len(self.steers)}], "
                f"got {tuple(columns_mf.shape)}"
            )
        self.sae = sae_part.eval()
        self.register_buffer(COLUMNS_TENSOR, columns_mf.detach().clone())
        self._positions = tuple(self.rows.index(s.latent) for s in self.steers)

    @classmethod
    def from_sae(cls, sae: SparseAutoencoder, steers: Steer | Sequence[Steer]) -> LatentSteer:
        steps = _as_steers(steers)
        rows = encoder_rows(sae, [s.latent for s in steps])
        w_dec = sae.W_dec.detach()
        cols = (
            torch.stack([w_dec[:, s.latent] for s in steps], dim=1)
            if steps
            else w_dec.new_zeros(w_dec.shape[0], 0)
        )
        return cls(_reduced_sae(sae, rows), rows, cols, steps)

    @property
    def is_identity(self) -> bool:
        return all(s.is_identity for s in self.steers)

    def train(self, mode: bool = True) -> LatentSteer:
        super().train(mode)
        self.sae.eval()  # the inference rule always (batchtopk: the saved threshold)
        return self

    def codes(self, acts_nm: torch.Tensor) -> torch.Tensor:
        """The reduced SAE's codes [N, R] of ``acts_nm`` (its own encode, in its dtype)."""
        dtype = self.columns.dtype
        return self.sae.encode(acts_nm.to(dtype)).to(acts_nm.dtype)

    def forward(self, acts_nm: torch.Tensor) -> torch.Tensor:
        out = acts_nm
        for i, (step, pos) in enumerate(zip(self.steers, self._positions, strict=True)):
            if step.is_identity:  # skipped: alpha = 0 returns the input bit for bit
                continue
            z_n = self.codes(out)[:, pos]
            delta_n = (step.gain - 1.0) * z_n if step.clamp is None else step.clamp - z_n
            out = out + delta_n.unsqueeze(1) * self.columns[:, i].to(out.dtype)
        return out

    # ---- the shipped form ------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the file holds (CPU), without the reduced SAE's unused decoder weight."""
        out = {
            name: t.detach().cpu()
            for name, t in self.sae.state_dict().items()
            if name != "decoder.weight"
        }
        return out | {COLUMNS_TENSOR: self.columns.detach().cpu()}

    def describe(self) -> dict[str, Any]:
        """The sidecar's record: the rule, the SAE's encode rule, the rows kept, the steps."""
        return {
            "rule": (
                "a' = a + (g - 1) * z_l(a) * columns[:, i], g = max(0, 1 + s * alpha) "
                "(s = -1 suppress, +1 enhance), or with a clamp v: a' = a + (v - z_l(a)) * "
                "columns[:, i]; z_l(a) = encode(a)[l] by the recorded SAE encode rule over the "
                "kept encoder rows; steps in order, each encoding the previous step's output; "
                "a step with g = 1 is skipped; logits = head(a')"
            ),
            "encode": self.sae.describe(),
            "encoder_rows": list(self.rows),
            "steps": [s.to_json() for s in self.steers],
        }

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], description: Mapping[str, Any]
    ) -> LatentSteer:
        """Rebuild from :meth:`tensors` and :meth:`describe`; a disagreement raises."""
        from salve.sae.registry import RULE_KEYS

        rule = dict(description["encode"])
        rows = [int(r) for r in description["encoder_rows"]]
        steers = [Steer.from_json(s) for s in description["steps"]]
        if COLUMNS_TENSOR not in tensors or "decoder.bias" not in tensors:
            raise ValueError("the steering tensors lack columns or decoder.bias")
        d_in = int(tensors["decoder.bias"].shape[0])
        part = build_sae(rule["kind"], d_in, len(rows), k=int(rule.get("k", 0)))
        differ = [key for key in RULE_KEYS if rule.get(key) != part.describe().get(key)]
        if differ:
            raise ValueError(
                f"the recorded encode rule disagrees with salve's {rule['kind']} SAE on "
                f"{', '.join(differ)}: written by another salve version"
            )
        state = {name: t for name, t in tensors.items() if name != COLUMNS_TENSOR}
        state["decoder.weight"] = torch.zeros_like(part.decoder.weight)
        dtype = tensors[COLUMNS_TENSOR].dtype
        part = part.to(dtype=dtype)
        part.load_state_dict(state)
        part.input_scale = rule.get("input_scale")
        return cls(part, rows, tensors[COLUMNS_TENSOR], steers)


# ---- from cached activations ------------------------------------------------------------------


def steer_activations(
    acts_nm: torch.Tensor, sae: SparseAutoencoder, steers: Steer | Sequence[Steer]
) -> torch.Tensor:
    """``a'`` for every row of ``acts_nm``, computed in its dtype (the SAE is cast to it)."""
    module = LatentSteer.from_sae(sae, steers).to(device=acts_nm.device, dtype=acts_nm.dtype)
    with torch.no_grad():
        return module(acts_nm)


def latent_codes(sae: SparseAutoencoder, acts_nm: torch.Tensor, dtype=F64) -> torch.Tensor:
    """Every latent's code [N, L] of ``acts_nm``, the SAE evaluated in ``dtype`` (eval mode)."""
    model = sae if sae.b_dec.dtype == dtype else copy.deepcopy(sae).to(dtype)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.encode_batched(acts_nm.detach().to(dtype))
    finally:
        model.train(was)


def steered_logits(
    acts_nm: torch.Tensor,
    weight_km: torch.Tensor,
    bias_k: torch.Tensor,
    codes_n: torch.Tensor,
    col_m: torch.Tensor,
    alphas_a: float | Sequence[float] | torch.Tensor,
    sign: Sign,
) -> torch.Tensor:
    """Logits [A, N, K] (float64) of the head on one latent's steered activations, per alpha:
    ``head(a) + (g - 1) z (W c)``, the same as ``head(a')`` because the head is linear. At
    ``g == 1`` the unsteered logits are returned exactly. ``codes_n``: the latent's codes."""
    x = acts_nm.detach().to(F64)
    w, b = weight_km.detach().to(F64), bias_k.detach().to(F64)
    alphas = torch.as_tensor(alphas_a, dtype=F64).reshape(-1)
    gains = torch.tensor([steer_gain(float(a), sign) for a in alphas.tolist()], dtype=F64)
    base_nk = x @ w.T + b
    wc_k = w @ col_m.detach().to(F64)
    shift_nk = codes_n.detach().to(F64).unsqueeze(1) * wc_k.unsqueeze(0)
    steered = base_nk.unsqueeze(0) + (gains - 1.0).view(-1, 1, 1) * shift_nk.unsqueeze(0)
    return torch.where((gains == 1.0).view(-1, 1, 1), base_nk.unsqueeze(0), steered)


def _accuracy(preds_an: torch.Tensor, labels: torch.Tensor, k: int):
    correct_an = (preds_an == labels.unsqueeze(0)).to(F64)
    counts_k = torch.bincount(labels, minlength=k).to(F64)
    hits_ak = torch.zeros(correct_an.shape[0], k, dtype=F64).index_add_(1, labels, correct_an)
    return hits_ak / counts_k, correct_an.sum(dim=1) / max(1, labels.shape[0])


def steered_accuracy_curves(
    acts_nm: torch.Tensor,
    labels_n: torch.Tensor,
    weight_km: torch.Tensor,
    bias_k: torch.Tensor,
    codes_n: torch.Tensor,
    col_m: torch.Tensor,
    alphas_a: float | Sequence[float] | torch.Tensor,
    sign: Sign,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`salve.editing.accuracy_curves`, for steering one latent: per-class accuracy
    [A, K] (nan for an empty class) and overall accuracy [A], fractions in [0, 1]."""
    k = weight_km.shape[0] if num_classes is None else int(num_classes)
    labels = torch.as_tensor(labels_n).to(torch.int64).reshape(-1)
    if labels.shape[0] != acts_nm.shape[0] or codes_n.shape[0] != acts_nm.shape[0]:
        raise ValueError("labels_n, codes_n and acts_nm disagree on N")
    alphas = torch.as_tensor(alphas_a, dtype=F64).reshape(-1)
    n = acts_nm.shape[0]
    chunk = max(1, _CHUNK_BUDGET // max(1, len(alphas) * k))
    preds = torch.empty(len(alphas), n, dtype=torch.int64)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        block = steered_logits(
            acts_nm[start:stop], weight_km, bias_k, codes_n[start:stop], col_m, alphas, sign
        )
        preds[:, start:stop] = block.argmax(dim=-1)
    return _accuracy(preds, labels, k)


def ablation_class_changes(
    acts_nm: torch.Tensor,
    labels_n: torch.Tensor,
    weight_km: torch.Tensor,
    bias_k: torch.Tensor,
    codes_nl: torch.Tensor,
    w_dec_ml: torch.Tensor,
    alpha: float,
    num_classes: int,
) -> torch.Tensor:
    """Per latent, each class's accuracy change when that latent alone is steered down at
    ``alpha`` (suppress), [L, K] float64 (the latent browser's steering effect)."""
    out = []
    for latent in range(w_dec_ml.shape[1]):
        acc = steered_accuracy_curves(
            acts_nm, labels_n, weight_km, bias_k, codes_nl[:, latent], w_dec_ml[:, latent],
            [0.0, alpha], "suppress", num_classes,
        )[0]  # fmt: skip
        out.append(acc[1] - acc[0])
    return torch.stack(out) if out else torch.zeros(0, num_classes, dtype=F64)


# ---- the shipped model ------------------------------------------------------------------------


class SteeredHead(nn.Module):
    """In the head's place: :class:`LatentSteer`, then the original linear head. ``linear`` is
    registered last, so it is the module tree's last ``nn.Linear`` (``salve.models.head_of``)
    and its input is ``a'`` (``salve.models.penultimate`` captures the steered activations;
    ``head_of(model)(a')`` is ``head(a')``, not steered twice)."""

    def __init__(self, steer: LatentSteer, linear: nn.Linear) -> None:
        super().__init__()
        self.steer = steer
        self.linear = linear

    def forward(self, acts_nm: torch.Tensor) -> torch.Tensor:
        # steer() returns its input itself when every step is skipped: alpha = 0 runs the
        # original head on the original tensor, bit for bit.
        return self.linear(self.steer(acts_nm))


class SteeredClassifier(nn.Module):
    """The base classifier with its head input steered: backbone -> :class:`LatentSteer` ->
    head. The classifier's head module is replaced by a :class:`SteeredHead` holding the
    steering and the original head, so the model stays one plain forward (no hooks: safe to
    copy, to move between devices and to call from several threads). ``classifier`` is changed
    in place: pass a module of its own (:func:`steered_classifier` copies)."""

    def __init__(self, classifier: nn.Module, steer: LatentSteer) -> None:
        super().__init__()
        self.head_name = head_path(classifier)
        head = classifier.get_submodule(self.head_name)
        classifier.set_submodule(self.head_name, SteeredHead(steer, head))
        self.classifier = classifier

    @property
    def steer(self) -> LatentSteer:
        return self.classifier.get_submodule(self.head_name).steer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base classifier's torchvision state dict (its head under its own name)."""
        head, out = self.head_name + ".", {}
        for key, t in self.classifier.state_dict().items():
            if key.startswith(head + "steer."):
                continue
            if key.startswith(head + "linear."):
                key = head + key[len(head + "linear.") :]
            out[key] = t
        return out


def steered_classifier(
    classifier: nn.Module, sae: SparseAutoencoder, steers: Steer | Sequence[Steer]
) -> SteeredClassifier:
    """A copy of ``classifier`` steered by the steps ``steers`` of ``sae``'s latents (eval
    mode); ``classifier`` itself is left as it was."""
    p = next(classifier.parameters())
    steer = LatentSteer.from_sae(sae, steers).to(device=p.device, dtype=p.dtype)
    return SteeredClassifier(copy.deepcopy(classifier), steer).eval()


def save_steered(path: str | Path, model: SteeredClassifier, sidecar: Mapping[str, Any]) -> None:
    """Safetensors (the classifier's torchvision state dict, plus the steering tensors under
    ``steer.``; no pickle) and a JSON sidecar beside it (``.json``): ``sidecar`` (classes,
    image_size, normalisation, ...) with the format, architecture, head and steering record."""
    from salve.io import save_tensors, write_json
    from salve.models import sidecar_path

    arch = getattr(model.classifier, "_salve_arch", None) or sidecar.get("architecture")
    if arch is None:
        arch = arch_of(model.classifier)  # raises the explanatory error
    state = model.base_state_dict()
    clash = [key for key in state if key.startswith(TENSOR_PREFIX)]
    if clash:
        raise ValueError(f"the classifier's state dict already uses the prefix: {clash[:3]}")
    state |= {TENSOR_PREFIX + name: t for name, t in model.steer.tensors().items()}
    record = (
        {"format": STEERED_FORMAT}
        | dict(sidecar)
        | {"architecture": arch, "head": model.head_name, "steering": model.steer.describe()}
    )
    save_tensors(path, state, metadata={"architecture": arch, "format": STEERED_FORMAT})
    write_json(sidecar_path(path), record)


def load_steered(path: str | Path) -> tuple[SteeredClassifier, dict]:
    """A saved steered model (eval mode, CPU) and its sidecar."""
    from salve.io import ArtifactError, load_tensors, read_json
    from salve.models import sidecar_path

    sidecar = read_json(sidecar_path(path))
    if sidecar.get("format") != STEERED_FORMAT or "steering" not in sidecar:
        raise ArtifactError(f"{sidecar_path(path)}: not a steered model ({STEERED_FORMAT})")
    state = load_tensors(path)
    base = {k: v for k, v in state.items() if not k.startswith(TENSOR_PREFIX)}
    steer_tensors = {
        k[len(TENSOR_PREFIX) :]: v for k, v in state.items() if k.startswith(TENSOR_PREFIX)
    }
    classifier = classifier_from_state(path, sidecar, base)
    try:
        steer = LatentSteer.from_tensors(steer_tensors, sidecar["steering"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: the steering part does not load ({exc})") from exc
    spec = arch_spec(sidecar["architecture"], int(sidecar["image_size"]))
    if steer.columns.shape[0] != spec.head_in:
        raise ArtifactError(
            f"{path}: steering acts on {steer.columns.shape[0]} values, the head reads "
            f"{spec.head_in}"
        )
    return SteeredClassifier(classifier, steer).eval(), sidecar
