"""Matching the latents of two SAEs: which latent of B, if any, is latent l of A.

One function serves every comparison of two SAEs: seeds of one SAE (evaluate's feature
stability), pipeline versions (`salve compare`, the nightly artifact) and SAE kinds (study). It
takes a similarity matrix [L_A, L_B], made one of two ways:

- ``decoder_cosines``: cosine of the decoder columns. A column is a direction in the space of
  the activations the SAE reads, so this compares like with like only when both SAEs read the
  same activations (the same backbone and extract outputs). After a retrain it compares two
  unrelated spaces and means nothing.
- ``code_correlations``: Pearson correlation of the two SAEs' codes over the same images. It
  needs no shared space, only the same images; a latent that never fires (a constant code)
  correlates 0 with everything.

``match_latents`` pairs the latents one-to-one maximising the total |similarity| (the Hungarian
method, scipy's ``linear_sum_assignment``). It is sign-blind, as a signed SAE's latent and its
negation are one feature; the sign is kept. A pair is a *match* when its |similarity| exceeds the
threshold. A latent of A left without one is *gone*, a latent of B *new*, unless it belongs to a
split or merge. A *split* is one latent of A above the threshold with two or more latents of B
that each have it as their closest latent of A, and that together explain it better than the
best of them alone: the share of its variance they explain (R^2, from the similarities within B)
exceeds the best one's by more than a match must explain, threshold^2. A *merge* is the mirror
image. "Closest" keeps two near-duplicate latents of one SAE from reading as a split when it is
compared with itself; the R^2 gain keeps a narrower SAE's near-duplicates from reading as one
(without the similarities within each SAE, every such group counts).

``THRESHOLD = 0.5``. A latent of A that is the normalised sum of two orthogonal latents of B has
cosine 1/sqrt(2) = 0.71 with each; of three, 1/sqrt(3) = 0.58. A threshold at or above those
values would call such a split "gone + new", so it must lie below 0.58. Chance lies far below 0.5:
two random directions in M = 512 dimensions have |cosine| about 1/sqrt(M) = 0.04, and the
largest of 64 x 64 such pairs is about 0.18. Codes over N = 359 val images correlate by chance
about 1/sqrt(N) = 0.05. So 0.5 separates a shared feature, whole or split in up to three, from
an accident. Evaluate's seed stability keeps its own, stricter 0.9 (the same feature refitted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

THRESHOLD = 0.5
DECODER_COSINE = "decoder cosine"
CODE_CORRELATION = "code correlation"
# Verdicts on a pair (a latent of A, a latent of B), in words.
VERDICTS = {
    "same": "same feature",
    "renumbered": "same feature, renumbered",
    "split": "split",
    "merge": "merge",
    "different": "different feature",
}
SURVIVED = ("same", "renumbered")


def unit_columns(w_ml: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Decoder columns scaled to unit norm (float64); a zero column (dead latent) stays zero."""
    w = torch.as_tensor(w_ml).detach().to(torch.float64)
    if w.dim() != 2:
        raise ValueError(f"a decoder must be [M, L], got {tuple(w.shape)}")
    norms = torch.linalg.vector_norm(w, dim=0)
    return w / torch.where(norms > 0, norms, 1.0)


def decoder_cosines(w_a_ml: torch.Tensor, w_b_ml: torch.Tensor) -> np.ndarray:
    """Signed cosine [L_A, L_B] of two decoders' columns (float64). Meaningful only when both
    decoders act on the same activations; a dead latent has cosine 0 with everything."""
    a, b = unit_columns(w_a_ml), unit_columns(w_b_ml)
    if a.shape[0] != b.shape[0]:
        raise ValueError("both decoders must act on the same activation size M")
    return (a.T @ b).numpy()


def code_correlations(codes_a_nl: torch.Tensor, codes_b_nl: torch.Tensor) -> np.ndarray:
    """Pearson correlation [L_A, L_B] of two SAEs' codes over the same N images (float64);
    0 where a latent's code is constant (it never fires, or always fires alike)."""
    a = torch.as_tensor(codes_a_nl).detach().to(torch.float64)
    b = torch.as_tensor(codes_b_nl).detach().to(torch.float64)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"codes must be [N, L] on the same N images, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    a, b = a - a.mean(0), b - b.mean(0)
    na, nb = torch.linalg.vector_norm(a, dim=0), torch.linalg.vector_norm(b, dim=0)
    # A spread this small against the code's own size is round-off: the latent is constant.
    tiny = torch.finfo(torch.float64).eps * a.shape[0]
    ok_a = na > tiny * (a.abs().amax(0) + 1e-300)
    ok_b = nb > tiny * (b.abs().amax(0) + 1e-300)
    corr = (a.T @ b) / torch.outer(torch.where(ok_a, na, 1.0), torch.where(ok_b, nb, 1.0))
    corr = corr * torch.outer(ok_a.to(corr.dtype), ok_b.to(corr.dtype))
    return corr.clamp(-1.0, 1.0).numpy()


@dataclass(frozen=True, eq=False)
class LatentMatching:
    """A one-to-one assignment of the latents of A to those of B, and what it means.

    ``similarity`` [L_A, L_B] is signed; ``match_a[a]`` is the latent of B assigned to ``a``
    (-1 where none: A has more latents), ``match_b`` the reverse; ``scores_a[a]`` the |similarity|
    of ``a``'s pair, 0 where it has none (unclipped: evaluate reports these numbers as they are).
    """

    similarity: np.ndarray
    threshold: float
    basis: str
    match_a: np.ndarray
    match_b: np.ndarray
    scores_a: np.ndarray
    within_a: np.ndarray | None = None  # [L_A, L_A] similarities among A's latents
    within_b: np.ndarray | None = None  # [L_B, L_B]

    @property
    def sizes(self) -> tuple[int, int]:
        return self.similarity.shape

    @cached_property
    def abs_similarity(self) -> np.ndarray:
        return np.abs(self.similarity)

    def score(self, a: int, b: int) -> float:
        """|similarity| of (a, b), within [0, 1] (a cosine of 1 + 2e-16 is 1)."""
        return float(min(1.0, self.abs_similarity[a, b]))

    def sign(self, a: int, b: int) -> int:
        return -1 if self.similarity[a, b] < 0 else 1

    def is_match(self, a: int, b: int) -> bool:
        """(a, b) is an assigned pair above the threshold."""
        return bool(
            b >= 0 and int(self.match_a[a]) == b and self.abs_similarity[a, b] > self.threshold
        )

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Every assigned pair (a, b), above the threshold or not, in the order of A."""
        return [(a, int(b)) for a, b in enumerate(self.match_a.tolist()) if b >= 0]

    @property
    def matched(self) -> list[tuple[int, int]]:
        """The assigned pairs above the threshold."""
        return [(a, b) for a, b in self.pairs if self.abs_similarity[a, b] > self.threshold]

    def closest_b(self, a: int) -> int:
        """A's latent ``a``'s closest latent of B (largest |similarity|), -1 when B has none."""
        return int(self.abs_similarity[a].argmax()) if self.sizes[1] else -1

    def closest_a(self, b: int) -> int:
        return int(self.abs_similarity[:, b].argmax()) if self.sizes[0] else -1

    @cached_property
    def splits(self) -> dict[int, list[int]]:
        """Latent of A -> the two or more latents of B it splits into (each above the
        threshold with it, closest to it among A's, and together explaining it better than
        the best alone: see the module), strongest first."""
        return _groups(self.similarity, self.threshold, self.within_b)

    @cached_property
    def merges(self) -> dict[int, list[int]]:
        """Latent of B -> the two or more latents of A merged into it (mirror of ``splits``)."""
        return _groups(self.similarity.T, self.threshold, self.within_a)

    @property
    def gone(self) -> list[int]:
        """Latents of A with no match above the threshold and in no split or merge."""
        held = {a for a, _ in self.matched} | set(self.splits)
        held |= {a for parts in self.merges.values() for a in parts}
        return [a for a in range(self.sizes[0]) if a not in held]

    @property
    def new(self) -> list[int]:
        """Latents of B with no match above the threshold and in no split or merge."""
        held = {b for _, b in self.matched} | set(self.merges)
        held |= {b for parts in self.splits.values() for b in parts}
        return [b for b in range(self.sizes[1]) if b not in held]


def _explained(s: np.ndarray, gram: np.ndarray) -> float:
    """R^2 of a unit direction (or standardised code) on parts with similarities ``s`` to it
    and ``gram`` among them: ``s^T gram^+ s``, within [0, 1]."""
    return float(np.clip(s @ np.linalg.pinv(gram, rcond=1e-10, hermitian=True) @ s, 0.0, 1.0))


def _groups(sim: np.ndarray, threshold: float, within: np.ndarray | None) -> dict[int, list[int]]:
    """Rows of ``sim`` -> the two or more columns they split into (see the module)."""
    mag = np.abs(sim)
    if 0 in mag.shape:
        return {}
    closest_row = mag.argmax(0)
    out = {}
    for r in range(mag.shape[0]):
        parts = [int(c) for c in np.nonzero((mag[r] > threshold) & (closest_row == r))[0]]
        if len(parts) < 2:
            continue
        parts.sort(key=lambda c: -mag[r, c])
        if within is not None:
            gain = _explained(sim[r, parts], within[np.ix_(parts, parts)]) - mag[r, parts[0]] ** 2
            if gain <= threshold**2:  # near-duplicates of one feature, not a split
                continue
        out[r] = parts
    return out


def match_latents(
    similarity: np.ndarray | torch.Tensor,
    threshold: float = THRESHOLD,
    basis: str = "",
    within_a: np.ndarray | None = None,
    within_b: np.ndarray | None = None,
) -> LatentMatching:
    """Hungarian assignment maximising the total |similarity| (one-to-one, sign-blind).
    ``within_a``/``within_b``: the same similarity among each SAE's own latents, which tell a
    split from near-duplicates (`match_decoders` and `match_codes` pass them)."""
    sim = np.asarray(torch.as_tensor(similarity).detach().to(torch.float64).numpy())
    if sim.ndim != 2:
        raise ValueError(f"a similarity matrix is [L_A, L_B], got shape {sim.shape}")
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold {threshold!r}: use a value in [0, 1)")
    sim = np.where(np.isfinite(sim), sim, 0.0)
    rows, cols = linear_sum_assignment(np.abs(sim), maximize=True)
    match_a = np.full(sim.shape[0], -1, dtype=np.int64)
    match_b = np.full(sim.shape[1], -1, dtype=np.int64)
    match_a[rows], match_b[cols] = cols, rows
    scores = np.zeros(sim.shape[0])
    scores[rows] = np.abs(sim)[rows, cols]
    return LatentMatching(
        sim, float(threshold), basis, match_a, match_b, scores, within_a, within_b
    )


def match_decoders(
    w_a_ml: torch.Tensor, w_b_ml: torch.Tensor, threshold: float = THRESHOLD
) -> LatentMatching:
    """`match_latents` on decoder cosines (both SAEs must read the same activations)."""
    return match_latents(
        decoder_cosines(w_a_ml, w_b_ml),
        threshold,
        DECODER_COSINE,
        decoder_cosines(w_a_ml, w_a_ml),
        decoder_cosines(w_b_ml, w_b_ml),
    )


def match_codes(
    codes_a_nl: torch.Tensor, codes_b_nl: torch.Tensor, threshold: float = THRESHOLD
) -> LatentMatching:
    """`match_latents` on code correlations over the same images (any two SAEs)."""
    return match_latents(
        code_correlations(codes_a_nl, codes_b_nl),
        threshold,
        CODE_CORRELATION,
        code_correlations(codes_a_nl, codes_a_nl),
        code_correlations(codes_b_nl, codes_b_nl),
    )


@dataclass(frozen=True)
class Verdict:
    """What became of latent ``a`` of A, judged against latent ``b`` of B (the latent that holds
    the same role in B: a class's dominant latent, say). ``match``: a's partner in B (-1: none);
    ``score``/``sign``: |similarity| and sign of (a, match), 0 / 1 without a partner;
    ``parts``: the latents of B in a split, of A in a merge."""

    a: int
    b: int
    kind: str  # a key of VERDICTS
    match: int
    score: float
    sign: int
    parts: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return VERDICTS[self.kind]

    @property
    def survived(self) -> bool:
        return self.kind in SURVIVED


def verdict(m: LatentMatching, a: int, b: int) -> Verdict:
    """Is latent ``b`` of B the feature ``a`` of A? Split (a splits into two or more latents of
    B, b among them); merge (b absorbs a and others); same, renumbered when b != a (above the
    threshold, and b is a's assigned pair or its closest latent of B: the one-to-one assignment
    may give b to a near-duplicate of a); else different. ``match``/``score`` are always a's
    assigned pair's."""
    match = int(m.match_a[a])
    score = m.score(a, match) if match >= 0 else 0.0
    sign = m.sign(a, match) if match >= 0 else 1
    if b in m.splits.get(a, ()):
        return Verdict(a, b, "split", match, score, sign, tuple(m.splits[a]))
    if a in m.merges.get(b, ()):
        return Verdict(a, b, "merge", match, score, sign, tuple(m.merges[b]))
    if b >= 0 and (m.is_match(a, b) or (m.closest_b(a) == b and m.score(a, b) > m.threshold)):
        return Verdict(a, b, "same" if a == b else "renumbered", match, score, sign)
    return Verdict(a, b, "different", match, score, sign)


def dominant_verdicts(
    m: LatentMatching, dominant_a: Sequence[int], dominant_b: Sequence[int]
) -> list[Verdict]:
    """One verdict per class: its dominant latent in A against its dominant latent in B."""
    if len(dominant_a) != len(dominant_b):
        raise ValueError("dominant_a and dominant_b need one latent per class each")
    return [verdict(m, int(a), int(b)) for a, b in zip(dominant_a, dominant_b, strict=True)]
