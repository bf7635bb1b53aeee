"""The task-arithmetic family: one parameterised merge of task vectors and its eight members
(``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``, ``breadcrumbs``,
``breadcrumbs_ties``, ``della``, ``della_linear``), plus its relative ``sce``.

Every member is mergekit's generalized task arithmetic on the task vectors
``τ_i = θ_i − θ_base``: sparsify each (:mod:`evomerge.merge.methods.sparsify`), weight it, combine
with or without TIES sign election, optionally normalize, scale by ``λ``, add to the base
(:func:`combine_deltas`). A member differs from the others only in its row of :data:`VARIANTS`
(sparsifier, sign election, the ``normalize`` default) and its sparsifier's row of
:data:`SPARSIFIERS` (density range, extra per-model parameter, the ``rescale`` default): the
defaults are stated there once, and the registered specs, the callables and docs/methods.md
follow from them.

All members are registered with ``takes_deltas=True``: they receive the task vectors instead of
the model tensors, so that a resident merger computes them once. The engine computes ``τ_i`` as
``tensor.float() - base.float()`` on both the disk and the in-memory path. ``int8_mask`` is
accepted for compatibility with mergekit recipes; it only changes mergekit's memory use, never
the result, so it is ignored here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from evomerge.errors import EvomergeError
from evomerge.merge.methods.averaging import WEIGHT_EPS
from evomerge.merge.methods.consensus import (CONSENSUS_BLOCK, CONSENSUS_BLOCK_GPU, DareStream,  # noqa: F401
                                              consensus_fused, consensus_reference, dare_streams)
from evomerge.merge.methods.params import fraction, per_model
from evomerge.merge.methods.sparsify import (bernoulli_sparsify, breadcrumbs_sparsify, della_sparsify, elect_sign,
                                             magnitude_threshold, sign_agreement_mask)
from evomerge.merge.registry import DENSITY, FRACTION, REQUIRED, MergeMethod, ParamRange, register

__all__ = [
    "task_vectors",
    "combine_deltas",
    "Sparsifier",
    "SPARSIFIERS",
    "Variant",
    "VARIANTS",
    "merge_task_vectors",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
]


def task_vectors(tensors: Sequence[Tensor], base: Tensor) -> list[Tensor]:
    """``τ_i = θ_i − θ_base`` for each source tensor (float32 in, float32 out)."""
    return [t - base for t in tensors]


def combine_deltas(
    deltas: Sequence[Tensor],
    base: Tensor,
    weights: Sequence[float],
    *,
    consensus: str | None = None,
    normalize: bool = False,
    lam: float = 1.0,
    thresholds: Sequence[Tensor | float | None] | None = None,
    dare: Sequence[DareStream | None] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """mergekit's generalized task arithmetic on already-sparsified deltas.

    ``δ_i = w_i τ_i``; with ``consensus`` ("sum"/"count") only the δ_i whose sign matches the
    elected sign count at each position; ``normalize`` divides by the sum of the weights of the
    models that count there (without consensus: by ``Σ w_i``), a zero divisor becomes 1; the mix
    is multiplied by ``lam`` and added to ``base``. ``thresholds`` (consensus only): one magnitude
    per delta (None = keep all); entries with ``|τ_i|`` below it count as zero — the TIES trim,
    fused in (the same result as :func:`magnitude_sparsify` first, without its full-size passes).
    ``dare`` (consensus, float32 on the CPU only): per delta a
    :class:`~evomerge.merge.methods.consensus.DareStream` — the DARE drop fused in (the same
    result as :func:`bernoulli_sparsify` first). ``out``: a float32 tensor of ``base``'s shape
    (not one of the inputs) that receives the result and is returned.
    """
    if len(deltas) != len(weights):
        raise EvomergeError(f"got {len(weights)} weights for {len(deltas)} models")
    if consensus is not None:
        fused = base.device.type == "cpu" and base.dtype == torch.float32 and all(
            d.device.type == "cpu" and d.dtype == torch.float32 for d in deltas)
        if fused:
            # imported here: numba's import (~0.2 s) is paid by consensus merges only
            from evomerge.merge.methods import consensus_compiled as compiled

            kernel = compiled.consensus_compiled if compiled.AVAILABLE else consensus_fused
            return kernel(deltas, base, weights, consensus, normalize, float(lam), thresholds, dare, out)
        if dare is not None:
            raise EvomergeError("combine_deltas: dare streams need float32 tensors on the CPU")
        res = consensus_reference(deltas, base, weights, consensus, normalize, float(lam), thresholds)
        return res if out is None else out.copy_(res)
    if thresholds is not None or dare is not None:
        raise EvomergeError("combine_deltas: thresholds and dare streams need a consensus method")
    # Σ w_i δ_i accumulated in one buffer (the inputs are never modified): as weighted_sum
    mixed = torch.mul(deltas[0], float(weights[0]), out=out) if out is not None else deltas[0] * float(weights[0])
    for d, w in zip(deltas[1:], weights[1:]):
        mixed.add_(d, alpha=float(w))
    if normalize:
        total = float(sum(float(w) for w in weights))
        if abs(total) >= WEIGHT_EPS:
            mixed.div_(total)
    if float(lam) != 1.0:
        mixed.mul_(float(lam))
    return mixed.add_(base)


# ----------------------------------------------------------------------------- the family


@dataclass(frozen=True)
class Sparsifier:
    """How members of the family trim each task vector before combining them."""

    density_range: ParamRange
    """The valid values of the per-model ``density`` (default 1: keep everything)."""
    extra: tuple[str, float] | None = None
    """A second per-model parameter (a fraction in [0, 1]) and its default."""
    rescale: bool | None = None
    """The default of the ``rescale`` switch; None: this sparsifier has no such parameter."""
    randomized: bool = False
    """Draws from the merge's generator."""


SPARSIFIERS = {
    # TIES trim: the density fraction of largest magnitudes, fused into the consensus merge
    "magnitude": Sparsifier(DENSITY),
    # DARE: keep each entry with probability density, rescale by its inverse
    "bernoulli": Sparsifier(DENSITY, rescale=True, randomized=True),
    # Model Breadcrumbs: drop the gamma fraction of largest and then the smallest magnitudes
    "breadcrumbs": Sparsifier(FRACTION, extra=("gamma", 0.01), rescale=False),
    # DELLA MAGPRUNE: keep probability in density ± epsilon by magnitude rank
    "della": Sparsifier(FRACTION, extra=("epsilon", 0.15), rescale=True, randomized=True),
}

GTA_GLOBALS = {"lambda": 1.0, "int8_mask": False}
"""Method-level parameters every member has (``int8_mask`` is accepted and ignored)."""


@dataclass(frozen=True)
class Variant:
    """One member of the family; calling it merges (:func:`merge_task_vectors`) with the
    member's defaults filled in for the parameters not given."""

    name: str
    sparsifier: str | None
    """A key of :data:`SPARSIFIERS`; None: the task vectors are used as they are."""
    sign_election: str | None
    """``"sum"``: TIES sign election (majority sign of the weighted sum); None: a plain sum."""
    normalize: bool
    """The default of ``normalize`` (divide by the weights that count at each position)."""
    reference: str

    def __post_init__(self):
        if self.sparsifier is not None and self.sparsifier not in SPARSIFIERS:
            raise ValueError(f"{self.name}: unknown sparsifier {self.sparsifier!r}")
        if self.sparsifier == "magnitude" and self.sign_election is None:
            raise ValueError(f"{self.name}: the magnitude sparsifier is fused into the sign-election merge")

    def model_params(self) -> dict:
        """The per-model parameters and their defaults."""
        params = {"weight": REQUIRED}
        if self.sparsifier is not None:
            params["density"] = 1.0
            extra = SPARSIFIERS[self.sparsifier].extra
            if extra is not None:
                params[extra[0]] = extra[1]
        return params

    def global_params(self) -> dict:
        """The method-level parameters and their defaults."""
        params = {"normalize": self.normalize}
        rescale = SPARSIFIERS[self.sparsifier].rescale if self.sparsifier is not None else None
        if rescale is not None:
            params["rescale"] = rescale
        return {**params, **GTA_GLOBALS}

    def spec(self) -> MergeMethod:
        """The registry entry of this member."""
        sparsifier = SPARSIFIERS[self.sparsifier] if self.sparsifier is not None else None
        ranges = {}
        if sparsifier is not None:
            ranges["density"] = sparsifier.density_range
            if sparsifier.extra is not None:
                ranges[sparsifier.extra[0]] = FRACTION
        return MergeMethod(
            name=self.name, fn=self, needs_base=True, takes_deltas=True,
            randomized=sparsifier is not None and sparsifier.randomized,
            model_params=self.model_params(), global_params=self.global_params(), ranges=ranges,
            reference=self.reference,
        )

    writes_into = True
    """Takes ``out=`` (a float32 tensor to write the merge into): the engine passes its output."""

    def __call__(self, deltas, base, *, generator=None, out=None, **params) -> Tensor:
        n = len(deltas)
        full = {k: [v] * n for k, v in self.model_params().items() if v is not REQUIRED}
        full.update(self.global_params())
        full.update(params)
        if "weight" not in full:
            raise EvomergeError(f"merge_method {self.name!r}: parameter 'weight' is required")
        return merge_task_vectors(self, deltas, base, generator=generator, out=out, **full)


_TA = "Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)"
_TIES = "Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)"
_DARE = "Yu et al. 2024, Language models are Super Mario (arXiv:2311.03099)"
_BREADCRUMBS = "Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795)"
_BREADCRUMBS_TIES = "Davari & Belilovsky 2024 (arXiv:2312.06795) + TIES sign election (arXiv:2306.01708)"
_DELLA = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)"

VARIANTS = {v.name: v for v in (
    #       name                sparsifier     sign election  normalize  reference
    Variant("task_arithmetic",  None,          None,          False,     _TA),
    Variant("ties",             "magnitude",   "sum",         True,      _TIES),
    Variant("dare_ties",        "bernoulli",   "sum",         False,     _DARE),
    Variant("dare_linear",      "bernoulli",   None,          False,     _DARE),
    Variant("breadcrumbs",      "breadcrumbs", None,          False,     _BREADCRUMBS),
    Variant("breadcrumbs_ties", "breadcrumbs", "sum",         False,     _BREADCRUMBS_TIES),
    Variant("della",            "della",       "sum",         True,      _DELLA),
    Variant("della_linear",     "della",       None,          False,     _DELLA),
)}
"""The members of the family, by name."""


def _sparsify(kind: str, delta: Tensor, density: float, extra: float | None, generator, rescale: bool) -> Tensor:
    if kind == "bernoulli":
        return bernoulli_sparsify(delta, density, generator=generator, rescale=rescale)
    if kind == "breadcrumbs":
        return breadcrumbs_sparsify(delta, density, extra, rescale=rescale)
    if kind == "della":
        return della_sparsify(delta, density, extra, generator=generator, rescale=rescale)
    raise ValueError(f"unknown sparsifier {kind!r}")


def merge_task_vectors(variant: Variant, deltas: Sequence[Tensor], base: Tensor, *,
                       generator: torch.Generator | None = None, out: Tensor | None = None, **params) -> Tensor:
    """``θ = θ_base + λ · Σ_i w_i S(τ_i)`` for one member: ``S`` its sparsifier, the sum with its
    sign election, divided by the weights that count when ``normalize`` (:func:`combine_deltas`).

    ``params``: every parameter the member declares (per-model ones as lists aligned with
    ``deltas``). The magnitude sparsifier (TIES) is fused into the consensus merge as one
    magnitude threshold per task vector: the same bits as :func:`magnitude_sparsify` first; so is
    DARE's drop in DARE-TIES on the CPU (:func:`~evomerge.merge.methods.consensus.dare_streams`).
    Randomized sparsifiers draw from ``generator`` model by model, in order. ``out``: see
    :func:`combine_deltas`.
    """
    n = len(deltas)
    weight = per_model("weight", params["weight"], n)
    thresholds = dare = None
    if variant.sparsifier == "magnitude":
        density = per_model("density", params["density"], n)
        thresholds = [magnitude_threshold(d, p) for d, p in zip(deltas, density)]
    elif (variant.sparsifier == "bernoulli" and variant.sign_election is not None and base.device.type == "cpu"
          and all(d.device.type == "cpu" and d.dtype == torch.float32 for d in (base, *deltas))):
        # DARE-TIES on the CPU: the keep masks drawn block by block inside the consensus merge
        dare = dare_streams(per_model("density", params["density"], n), generator, params["rescale"])
    elif variant.sparsifier is not None:
        density = per_model("density", params["density"], n)
        extra_name = (SPARSIFIERS[variant.sparsifier].extra or (None,))[0]
        extra = per_model(extra_name, params[extra_name], n) if extra_name else [None] * n
        deltas = [_sparsify(variant.sparsifier, d, p, x, generator, params["rescale"])
                  for d, p, x in zip(deltas, density, extra)]
    return combine_deltas(deltas, base, weight, consensus=variant.sign_election, normalize=params["normalize"],
                          lam=params["lambda"], thresholds=thresholds, dare=dare, out=out)


task_arithmetic = VARIANTS["task_arithmetic"]
ties = VARIANTS["ties"]
dare_ties = VARIANTS["dare_ties"]
dare_linear = VARIANTS["dare_linear"]
breadcrumbs = VARIANTS["breadcrumbs"]
breadcrumbs_ties = VARIANTS["breadcrumbs_ties"]
della = VARIANTS["della"]
della_linear = VARIANTS["della_linear"]


# ----------------------------------------------------------------------------- SCE


def sce(deltas, base, *, generator=None, select_topk=1.0, int8_mask=False):
    """SCE merging (Wan et al. 2024, FuseChat, arXiv:2408.07990), mergekit's ``sce``.

    1. Select: with ``select_topk < 1``, keep only the ``k = ⌊select_topk · #{var > 0}⌋`` positions
       with the largest variance of ``τ_i`` across models (population variance), in every τ_i.
    2. Calculate: ``w_i = mean(τ_i²) / Σ_j mean(τ_j²)`` (equal weights when all are 0).
    3. Erase: majority sign ``s = sign(Σ τ_i)`` (0 → +); ``θ = θ0 + Σ w_i τ_i [sign τ_i = s] /
       Σ w_i [sign τ_i = s]`` (a zero divisor → 1).

    Difference from mergekit: when ``k`` rounds to 0 but some position varies, one position is
    kept (mergekit zeroes the whole update — the same whole-tensor-zeroing as in breadcrumbs).
    """
    topk = fraction("select_topk", select_topk)
    ds = list(deltas)
    if topk < 1.0:
        stacked = torch.stack(ds)
        var = stacked.var(dim=0, unbiased=False).reshape(-1)
        nz = int(torch.count_nonzero(var))
        k = int(topk * nz)
        if nz > 0 and k == 0 and topk > 0:
            k = 1
        mask = torch.zeros_like(var, dtype=torch.bool)
        if k > 0:
            mask[torch.topk(var, k).indices] = True
        mask = mask.reshape(ds[0].shape)
        ds = [d * mask for d in ds]
    msq = [float((d.double() ** 2).mean()) if d.numel() else 0.0 for d in ds]
    tot = sum(msq)
    w = [1.0 / len(ds)] * len(ds) if tot == 0 else [m / tot for m in msq]
    majority = elect_sign(ds, "sum")
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for d, wi in zip(ds, w):
        m = sign_agreement_mask(d, majority)
        mixed.add_(d * m, alpha=wi)
        divisor.add_(m, alpha=wi)
    divisor[divisor == 0] = 1.0
    return base + mixed / divisor


# ----------------------------------------------------------------------------- registration

for _variant in VARIANTS.values():
    register(_variant.spec())
register(MergeMethod(
    name="sce", fn=sce, needs_base=True, takes_deltas=True,
    global_params={"select_topk": 1.0, "int8_mask": False}, ranges={"select_topk": FRACTION},
    reference="Wan et al. 2024, FuseChat: SCE merging (arXiv:2408.07990)",
))
