"""Feature matches between two revisions: is a class still carried by the same latent?"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from salve.present.kit import fmt

if TYPE_CHECKING:
    from salve.matching import LatentMatching, Verdict
    from salve.present.compare.page import RevisionData
    from salve.present.kit import Embeds


@dataclass
class FeatureSide:
    """One revision's SAE as the feature matching reads it (None where absent there).

    ``stage_outputs``: stage -> its outputs' md5 as that revision's dvc.lock records them (which
    activations the SAE read). ``val_codes_nl``: the SAE's codes on that revision's val
    activations. ``browser``: the href of its latent browser from the page, or None with
    ``browser_note`` saying where it is. ``strips``: results/gradfam/latent_<l>.png by latent.
    """

    decoder_ml: Any = None
    val_codes_nl: Any = None
    classes: list[str] | None = None
    dominant: list[int] | None = None
    cross_class: list[dict] | None = None
    stage_outputs: dict[str, str] = field(default_factory=dict)
    browser: str | None = None
    browser_note: str = ""
    strips: dict[int, bytes] = field(default_factory=dict)
    strips_note: str = ""


# Their outputs fix the activations an SAE reads: equal at both revisions, one space.
ACTIVATION_STAGES = ("finetune", "extract")
MAX_STRIP_CLASSES = 20  # classes whose matched pair's Grad-FAM strips the page shows


@dataclass(frozen=True)
class ClassMatch:
    """One class: its dominant latent in A and in B (None where a side lacks it) and what became
    of A's (``verdict``: None where no match is possible). ``code_corr``: |correlation| of the
    codes of A's latent and its assigned pair, beside a decoder-cosine match when both runs kept
    val codes."""

    index: int
    name: str
    a: int | None
    b: int | None
    verdict: Verdict | None = None
    shown_b: int | None = None  # B's latent drawn beside A's: its match, else B's dominant
    code_corr: float | None = None


@dataclass(frozen=True)
class CrossMatch:
    """A cross-class feature of A or B and its counterpart in the other run."""

    a: int | None
    a_classes: tuple[str, ...]
    b: int | None
    b_classes: tuple[str, ...]
    verdict: Verdict | None
    note: str = ""


@dataclass
class FeatureMatches:
    """The feature matching of two revisions. ``status``: "matched"; "impossible" (the
    activations differ and no shared val codes exist: no similarity means anything); or
    "unavailable" (a revision lacks its SAE or ranking). ``note`` says which basis and why."""

    status: str
    basis: str
    threshold: float
    note: str
    matching: LatentMatching | None = None
    codes: LatentMatching | None = None  # code correlation, as a check beside decoder cosine
    classes: list[ClassMatch] = field(default_factory=list)
    cross: list[CrossMatch] = field(default_factory=list)

    @property
    def survived(self) -> int:
        """Classes whose dominant feature in A is still their dominant one in B (any number)."""
        return sum(bool(c.verdict and c.verdict.survived) for c in self.classes)

    @property
    def judged(self) -> int:
        return sum(c.verdict is not None for c in self.classes)

    def counts(self) -> dict[str, int]:
        from salve.matching import VERDICTS

        out = dict.fromkeys(VERDICTS, 0)
        for c in self.classes:
            if c.verdict is not None:
                out[c.verdict.kind] += 1
        return out

    def summary(self) -> str:
        """The matched latents over all, in one sentence ("" without a matching)."""
        m = self.matching
        if m is None:
            return ""
        la, lb = m.sizes
        parts = [
            f"{len(m.matched)} latent pairs matched (|{m.basis}| > {fmt(m.threshold)}) of A's "
            f"{la} and B's {lb} latents",
            f"{len(m.gone)} of A gone",
            f"{len(m.new)} of B new",
        ]
        if m.splits or m.merges:
            parts.append(f"{len(m.splits)} split(s), {len(m.merges)} merge(s)")
        return "; ".join(parts) + "."

    def strip_latents(self) -> tuple[set[int], set[int]]:
        """Latents of A and of B whose Grad-FAM strips the page draws."""
        if self.status != "matched":
            return set(), set()
        rows = [c for c in self.classes if c.a is not None and c.shown_b is not None]
        rows = rows[:MAX_STRIP_CLASSES]
        return {int(c.a) for c in rows}, {int(c.shown_b) for c in rows}


def _short(md5: str | None) -> str:
    return (md5 or "none")[:8]


def _activation_note(fa: FeatureSide, fb: FeatureSide) -> tuple[bool, str]:
    """Whether both SAEs read the same activations (dvc.lock's records agree), and why not."""
    differ, unknown = [], []
    for stage in ACTIVATION_STAGES:
        x, y = fa.stage_outputs.get(stage), fb.stage_outputs.get(stage)
        if x is None or y is None:
            unknown.append(f"{stage} at {'A' if x is None else 'B'}")
        elif x != y:
            what = " (a retrained backbone)" if stage == "finetune" else ""
            differ.append(f"{stage} output {_short(x)} -> {_short(y)}{what}")
    if differ:
        return False, "The activations differ between A and B: " + "; ".join(differ) + "."
    if unknown:
        return False, (
            "Which activations the SAEs read is not recorded in dvc.lock ("
            + ", ".join(unknown)
            + "), so they may differ."
        )
    if fa.decoder_ml.shape[0] != fb.decoder_ml.shape[0]:
        return False, "The SAEs read activations of different widths."
    outs = ", ".join(f"{s} {_short(fa.stage_outputs[s])}" for s in ACTIVATION_STAGES)
    return True, f"A and B read the same activations (the same outputs of {outs})."


def _codes_pair(fa: FeatureSide, fb: FeatureSide, shared_images: bool | None) -> str:
    """Why the two runs' val codes cannot be correlated ("" when they can)."""
    lacking = [s for s, f in (("A", fa), ("B", fb)) if f.val_codes_nl is None]
    if lacking:
        return f"{' and '.join(lacking)} kept no val activations (results/extract)"
    if not shared_images or fa.val_codes_nl.shape[0] != fb.val_codes_nl.shape[0]:
        return "the two runs' val images differ"
    return ""


def _class_verdict(m: LatentMatching, a: int, b: int) -> tuple[Verdict, int]:
    from salve.matching import verdict

    v = verdict(m, a, b)
    if v.kind != "different":
        return v, b
    if v.match >= 0 and m.is_match(a, v.match):
        return v, v.match  # A's feature lives on in B, as another latent
    return v, b


def _cross_rows(m: LatentMatching | None, fa: FeatureSide, fb: FeatureSide) -> list[CrossMatch]:
    from salve.matching import verdict

    def names(f: FeatureSide, entry: Mapping[str, Any]) -> tuple[str, ...]:
        classes = f.classes or []
        return tuple(classes[k] if 0 <= k < len(classes) else str(k) for k in entry["classes"])

    cross_a = {int(c["feature"]): names(fa, c) for c in fa.cross_class or []}
    cross_b = {int(c["feature"]): names(fb, c) for c in fb.cross_class or []}
    rows, used = [], set()
    for a, classes in cross_a.items():
        if m is None:
            rows.append(CrossMatch(a, classes, None, (), None))
            continue
        sims = {b: m.abs_similarity[a, b] for b in cross_b}
        best = max(sims, key=sims.get, default=None)
        b = best if best is not None and sims[best] > m.threshold else int(m.match_a[a])
        v = verdict(m, a, b)
        note = "" if b in cross_b else "not cross-class in B"
        if b in cross_b:
            used.add(b)
        rows.append(CrossMatch(a, classes, b if b >= 0 else None, cross_b.get(b, ()), v, note))
    for b, classes in cross_b.items():
        if b in used:
            continue
        if m is None:
            rows.append(CrossMatch(None, (), b, classes, None))
            continue
        a = int(m.match_b[b])
        v = verdict(m, a, b) if a >= 0 else None
        note = "not cross-class in A" if a >= 0 else "no partner in A"
        rows.append(CrossMatch(a if a >= 0 else None, (), b, classes, v, note))
    return rows


def match_features(
    a: RevisionData,
    b: RevisionData,
    *,
    shared_val_images: bool | None = None,
    threshold: float | None = None,
) -> FeatureMatches:
    """Match A's latents to B's and judge each class's dominant feature and each cross-class
    feature. Decoder cosine when both SAEs read the same activations; after a retrain (the
    finetune or extract outputs differ) the correlation of their codes on the val images both
    kept (``shared_val_images``: the same images at both); else no match, and the note says why.
    ``threshold``: salve.matching.THRESHOLD unless given.
    """
    from salve.matching import (
        CODE_CORRELATION,
        DECODER_COSINE,
        THRESHOLD,
        match_codes,
        match_decoders,
    )

    threshold = THRESHOLD if threshold is None else threshold
    fa, fb = a.features or FeatureSide(), b.features or FeatureSide()
    lacking = [
        f"{what} at {side} ({label})"
        for side, label, f in (("A", a.label, fa), ("B", b.label, fb))
        for what, value in (
            ("no SAE (results/fit_sae)", f.decoder_ml),
            ("no ranking of its SAE (results/rank)", f.dominant),
        )
        if value is None
    ]
    classes = fa.classes or fb.classes or []
    index_b = {name: k for k, name in enumerate(fb.classes or classes)}

    def rows(m: LatentMatching | None, codes: LatentMatching | None) -> list[ClassMatch]:
        out = []
        for k, name in enumerate(classes):
            da = fa.dominant[k] if fa.dominant and k < len(fa.dominant) else None
            kb = index_b.get(name)
            db = (
                fb.dominant[kb]
                if fb.dominant and kb is not None and kb < len(fb.dominant)
                else None
            )
            if m is None or da is None or db is None:
                out.append(ClassMatch(k, name, da, db))
                continue
            v, shown = _class_verdict(m, int(da), int(db))
            corr = codes.score(int(da), v.match) if codes is not None and v.match >= 0 else None
            out.append(ClassMatch(k, name, int(da), int(db), v, shown, corr))
        return out

    if lacking:
        note = "No feature matching: " + "; ".join(lacking) + "."
        return FeatureMatches("unavailable", "", threshold, note, classes=rows(None, None))
    same, why = _activation_note(fa, fb)
    codes_missing = _codes_pair(fa, fb, True if same else shared_val_images)
    if same:
        m = match_decoders(fa.decoder_ml, fb.decoder_ml, threshold)
        codes = None
        if not codes_missing:
            codes = match_codes(fa.val_codes_nl, fb.val_codes_nl, threshold)
        n = "" if codes is None else f" Their codes on the {fa.val_codes_nl.shape[0]} val images"
        check = f"{n} are correlated as a check (column code corr.)." if codes else ""
        note = f"{why} Latents are matched by decoder-column cosine.{check}"
        return FeatureMatches(
            "matched",
            DECODER_COSINE,
            threshold,
            note,
            m,
            codes,
            rows(m, codes),
            _cross_rows(m, fa, fb),
        )
    why += " Decoder cosines would compare two different spaces, so they are not used."
    if codes_missing:
        note = f"{why} No match is possible: {codes_missing}."
        return FeatureMatches(
            "impossible",
            "",
            threshold,
            note,
            classes=rows(None, None),
            cross=_cross_rows(None, fa, fb),
        )
    m = match_codes(fa.val_codes_nl, fb.val_codes_nl, threshold)
    n = fa.val_codes_nl.shape[0]
    note = (
        f"{why} Latents are matched by the correlation of their codes on the {n} val images "
        "both runs kept."
    )
    return FeatureMatches(
        "matched", CODE_CORRELATION, threshold, note, m, None, rows(m, None), _cross_rows(m, fa, fb)
    )


def _latents(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values)


def _detail(c: ClassMatch, m: LatentMatching) -> str:
    v = c.verdict
    if v is None:
        return ""
    if v.kind in ("same", "renumbered"):
        flip = " (sign flipped)" if m.sign(v.a, v.b) < 0 else ""
        said = (
            f"latent {v.a} in both"
            if v.kind == "same"
            else f"latent {v.a} of A is latent {v.b} of B"
        )
        if v.match == v.b:
            return said + flip
        return (
            f"{said}{flip}: its closest latent there, |{m.basis}| {fmt(m.score(v.a, v.b))}; the "
            f"one-to-one assignment gives {v.b} to A's {int(m.match_b[v.b])} instead"
        )
    if v.kind == "split":
        cos = ", ".join(fmt(m.score(v.a, p)) for p in v.parts)
        return f"latent {v.a} of A splits into latents {_latents(v.parts)} of B (|{m.basis}| {cos})"
    if v.kind == "merge":
        cos = ", ".join(fmt(m.score(p, v.b)) for p in v.parts)
        return f"latents {_latents(v.parts)} of A merge into latent {v.b} of B (|{m.basis}| {cos})"
    if v.match >= 0 and m.is_match(v.a, v.match):
        return (
            f"A's latent {v.a} lives on as latent {v.match} of B, which is not this class's "
            f"dominant latent there ({v.b} is)"
        )
    if v.match >= 0:
        return (
            f"A's latent {v.a} has no match in B: its assigned pair, latent {v.match}, is at "
            f"|{m.basis}| {fmt(v.score)} ≤ {fmt(m.threshold)} (gone)"
        )
    return f"A's latent {v.a} has no partner in B (B has fewer latents): gone"


def _match_cell(c: ClassMatch, m: LatentMatching | None) -> tuple[str, str, str, str]:
    """(match shown, data-match, |similarity| shown, data-score) of a class row."""
    v = c.verdict
    if m is None or v is None or v.match < 0:
        return "–", "", "–", ""
    score = f"{v.score:.6f}"
    if not m.is_match(v.a, v.match):
        return f"none (closest pair: {v.match})", "", fmt(v.score), score
    flip = " (sign flipped)" if v.sign < 0 else ""
    return f"{v.match}{flip}", str(v.match), fmt(v.score), score


def _links(side: str, f: FeatureSide, latents: Sequence[int | None]) -> list[tuple[str, str]]:
    return [
        (f"{f.browser}#latent-{lat}", f"{side}: latent {lat}")
        for lat in dict.fromkeys(latents)
        if lat is not None and f.browser
    ]


def features_context(
    fm: FeatureMatches, a: RevisionData, b: RevisionData, embeds: Embeds
) -> dict[str, Any]:
    """The feature-matches section as plain data: rows per class and cross-class feature, the
    assigned pairs, links into both latent browsers, the Grad-FAM strips of matched pairs."""
    fa, fb = a.features or FeatureSide(), b.features or FeatureSide()
    m = fm.matching
    rows = []
    for c in fm.classes:
        shown, match_attr, score, score_attr = _match_cell(c, m)
        v = c.verdict
        rows.append(
            {
                "index": c.index,
                "name": c.name,
                "a": fmt(c.a),
                "b": fmt(c.b),
                "match": shown,
                "match_attr": match_attr,
                "score": score,
                "score_attr": score_attr,
                "code_corr": fmt(c.code_corr) if c.code_corr is not None else "–",
                "verdict": v.kind if v else "none",
                "label": v.label if v else "no match possible",
                "detail": _detail(c, m) if v and m else "",
                "links": _links("A", fa, [c.a]) + _links("B", fb, [c.b, c.shown_b]),
            }
        )
    cross = []
    for x in fm.cross:
        v = x.verdict
        paired = m is not None and x.a is not None and x.b is not None
        score = fmt(m.score(x.a, x.b)) if paired else "–"
        cross.append(
            {
                "a": "–"
                if x.a is None
                else f"{x.a} ({', '.join(x.a_classes) or 'not cross-class'})",
                "b": "–"
                if x.b is None
                else f"{x.b} ({', '.join(x.b_classes) or 'not cross-class'})",
                "score": score,
                "label": (v.label if v else "no match possible")
                + (f"; {x.note}" if x.note else ""),
                "links": _links("A", fa, [x.a]) + _links("B", fb, [x.b]),
            }
        )
    pairs = []
    if m is not None:
        for pa, pb in m.pairs:
            status = "match" if m.is_match(pa, pb) else f"≤ {fmt(m.threshold)}: not a match"
            pairs.append((pa, pb, fmt(m.score(pa, pb)), f"{m.similarity[pa, pb]:+.4f}", status))
    strips = []
    want_a, want_b = fm.strip_latents()
    for c in fm.classes:
        if c.a not in want_a or c.shown_b not in want_b:
            continue
        matched = m is not None and c.verdict is not None and c.verdict.kind != "different"
        matched = matched or (m is not None and m.is_match(c.a, c.shown_b))
        what = (
            f"|{m.basis}| {fmt(m.score(c.a, c.shown_b))}"
            if matched
            else "B's dominant latent: not a match"
        )
        strips.append(
            (
                f"class {c.name}",
                embeds.figure(
                    fa.strips.get(c.a), f"A ({a.label}): latent {c.a}", fa.strips_note or "–"
                ),
                embeds.figure(
                    fb.strips.get(c.shown_b),
                    f"B ({b.label}): latent {c.shown_b}, {what}",
                    fb.strips_note or "–",
                ),
            )
        )
    judged = fm.judged
    return {
        "status": fm.status,
        "note": fm.note,
        "basis": fm.basis,
        "threshold": fmt(fm.threshold),
        "summary": fm.summary(),
        "survived": (
            f"{fm.survived} of {len(fm.classes)} classes keep their dominant feature "
            "(same feature, renumbered or not)."
            if judged
            else ""
        ),
        "has_codes": fm.codes is not None,
        "rows": rows,
        "cross": cross,
        "pairs": pairs,
        "gone": _latents(m.gone) if m is not None else "",
        "new": _latents(m.new) if m is not None else "",
        "strips": strips,
        "browsers": [
            (side, rev.label, f.browser, f.browser_note)
            for side, rev, f in (("A", a, fa), ("B", b, fb))
        ],
    }


def features_markdown(fm: FeatureMatches | None, since: str) -> str:
    """The nightly artifact's line: how many classes' dominant features survived since ``since``."""
    if fm is None:
        return f"Dominant features since {since}: not compared."
    if fm.status != "matched":
        return f"Dominant features since {since}: not compared. {fm.note}"
    from salve.matching import VERDICTS

    detail = ", ".join(f"{n} {VERDICTS[k]}" for k, n in fm.counts().items() if n)
    return (
        f"{fm.survived} of {len(fm.classes)} classes' dominant features survived since {since} "
        f"(by {fm.basis} > {fmt(fm.threshold)}: {detail or 'none judged'})."
    )
