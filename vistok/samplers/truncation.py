"""Truncation samplers: each keeps a subset of the vocabulary and sets the other logits to ``filter_value``.

Every method comes twice: a batched function on logits (``top_p_filter(logits, 0.9)``), whose parameter may be
a number or a tensor with one value per row, and a Hugging Face-compatible processor
(``TopPFilter(0.9)``, usable in ``model.generate(logits_processor=...)``).

Shared conventions:

* ``logits``: ``[B, V]``, any float dtype (half types are judged in float32); the result has the same dtype and
  is a new tensor. ``-inf`` logits are allowed (tokens already removed); NaN or ``+inf`` raise
  :class:`~vistok.samplers.InvalidLogitsError`; a row whose logits are all ``-inf`` is returned unchanged (the
  sampling step refuses it).
* **Ties are kept together**: a token is kept or removed by comparing its value with a threshold, so tokens
  with equal logits share their fate (Hugging Face's sort-based processors may split a tie at the cut-off,
  depending on the sort's arbitrary order; vistok then keeps the whole tie).
* ``min_tokens_to_keep``: the ``k`` best tokens by the method's own ranking (probability, or typicality for
  typical sampling), ties included, are always kept.
* A *neutral* parameter value disables a method for a row: ``top_k <= 0``, ``top_p = 1``, ``min_p = 0``,
  ``typical_p = 1``, ``epsilon = 0``, ``eta = 0``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import is_int
from ..errors import InvalidConfigError
from ._params import RowParam, broadcast_param, check_logits, check_row_max, checked, work_dtype
from ._processor import LogitsFilter, check_filter_value, check_min_tokens
from ._select import mass_threshold

__all__ = [
    "top_k_filter",
    "top_p_filter",
    "min_p_filter",
    "typical_filter",
    "epsilon_filter",
    "eta_filter",
    "top_h_filter",
    "TopKFilter",
    "TopPFilter",
    "MinPFilter",
    "TypicalFilter",
    "EpsilonFilter",
    "EtaFilter",
    "TopHFilter",
    "TOP_H_RULES",
]

NEG_INF = -math.inf
TOP_H_RULES = ("paper", "reference")


# ----------------------------------------------------------------------------------------------------------------
# Batched functions
# ----------------------------------------------------------------------------------------------------------------


def check_top_h_options(rule: str, top_n: int | None) -> tuple[str, int | None]:
    """Top-H's ``rule`` (one of :data:`TOP_H_RULES`) and ``top_n`` (``None`` or an int ``>= 1``), checked."""
    if rule not in TOP_H_RULES:
        raise InvalidConfigError(f"top-H rule must be one of {TOP_H_RULES}, got {rule!r}")
    if top_n is not None and not is_int(top_n, 1):
        raise InvalidConfigError(f"top_n must be None or an int >= 1, got {top_n!r}")
    return rule, top_n


def top_k_filter(logits: Tensor, k: RowParam, *, min_tokens_to_keep: int = 1,
                 filter_value: float = NEG_INF) -> Tensor:
    """Keep the ``k`` highest logits of each row (and every token tied with the ``k``-th).

    Same tokens as Hugging Face's ``TopKLogitsWarper(k, min_tokens_to_keep=...)``. ``k <= 0`` (or ``>= V``)
    keeps everything.

    Args:
        k: an int or a ``[B]`` integer tensor.
    """
    check_logits(logits)
    k = checked(k, "top_k")
    check_min_tokens(min_tokens_to_keep)
    check_filter_value(filter_value)
    work = work_dtype(logits)
    vocab = logits.shape[1]
    if isinstance(k, int):
        keep_count = vocab if k <= 0 else min(max(k, min_tokens_to_keep), vocab)
        values = work.topk(keep_count, dim=1).values
        check_row_max(values[:, :1])
        if keep_count == vocab:
            return logits.clone()
        threshold = values[:, -1:]
    else:
        k = broadcast_param(k, logits, "top_k").long()
        keep_count = torch.where(k <= 0, vocab, k.clamp(min=min_tokens_to_keep)).clamp_(max=vocab)
        values = work.topk(int(keep_count.max()), dim=1).values
        check_row_max(values[:, :1])
        threshold = values.gather(1, keep_count - 1)
    return torch.where(work >= threshold, logits, filter_value)


def top_p_filter(logits: Tensor, p: RowParam, *, min_tokens_to_keep: int = 1,
                 filter_value: float = NEG_INF) -> Tensor:
    """Nucleus sampling (Holtzman et al., 2020): keep the most probable tokens until their mass reaches ``p``.

    A token is kept iff the probability mass of the tokens strictly more probable than it is below ``p``: the
    smallest prefix of the sorted distribution whose mass is ``>= p``, plus every token tied with its last one.
    Same tokens as Hugging Face's ``TopPLogitsWarper`` up to the tie rule and float rounding at the cut-off. No
    full sort: a histogram of the logits locates the cut-off (``_select.mass_threshold``).

    Args:
        p: a number or ``[B]`` tensor in ``[0, 1]``; ``1`` keeps everything, ``0`` keeps the top token(s).
    """
    check_logits(logits)
    p = checked(p, "top_p")
    check_min_tokens(min_tokens_to_keep)
    check_filter_value(filter_value)
    work = work_dtype(logits)
    row_max = work.amax(dim=1, keepdim=True)
    check_row_max(row_max)
    if not isinstance(p, Tensor) and p >= 1.0:
        return logits.clone()
    p = broadcast_param(p, logits, "top_p", work.dtype)
    weight = torch.exp(work - row_max.clamp(min=torch.finfo(work.dtype).min))
    threshold = mass_threshold(work, weight, p)
    if isinstance(p, Tensor):
        threshold = threshold.masked_fill(p >= 1.0, NEG_INF)
    keep = work >= threshold
    return _finish(logits, work, keep, min_tokens_to_keep, filter_value)


def min_p_filter(logits: Tensor, p: RowParam, *, min_tokens_to_keep: int = 1,
                 filter_value: float = NEG_INF) -> Tensor:
    """Min-p sampling (Nguyen et al., 2024): keep tokens whose probability is at least ``p`` times the top one's.

    The same arithmetic as Hugging Face's ``MinPLogitsWarper`` (softmax, then compare), so the same tokens.
    The test only involves probability ratios, so it gives the same cut on any renormalisation of the
    distribution that keeps the top token.

    Args:
        p: a number or ``[B]`` tensor in ``[0, 1]``; ``0`` keeps everything.
    """
    check_logits(logits)
    p = checked(p, "min_p")
    check_min_tokens(min_tokens_to_keep)
    check_filter_value(filter_value)
    work = work_dtype(logits)
    if not isinstance(p, Tensor) and p == 0.0:
        check_row_max(work.amax(dim=1, keepdim=True))
        return logits.clone()
    probs = work.softmax(dim=1)
    top = probs.amax(dim=1, keepdim=True)
    keep = probs >= broadcast_param(p, logits, "min_p", work.dtype) * top
    if not bool(torch.isfinite(top).all()):  # NaN, +inf, or an empty row: find out which
        keep |= check_row_max(work.amax(dim=1, keepdim=True))  # an empty row stays -inf, whatever filter_value
    return _finish(logits, work, keep, min_tokens_to_keep, filter_value)


def typical_filter(logits: Tensor, mass: RowParam, *, min_tokens_to_keep: int = 1,
                   filter_value: float = NEG_INF) -> Tensor:
    """Locally typical sampling (Meister et al., 2023): keep the tokens whose surprisal ``-log p`` is closest to
    the entropy ``H`` until their probability mass reaches ``mass``.

    A token is kept iff ``|-log p - H| <= d*``, where ``d*`` is the smallest distance at which the tokens
    within it hold at least ``mass`` of the probability. Same tokens as Hugging Face's ``TypicalLogitsWarper``
    up to float rounding at the cut-off; ``min_tokens_to_keep`` keeps the most *typical* tokens, like Hugging
    Face. Typical sampling can remove the most probable token. No full sort (``_select.mass_threshold``).

    Args:
        mass: a number or ``[B]`` tensor in ``[0, 1]``; ``1`` keeps everything.
    """
    check_logits(logits)
    mass = checked(mass, "typical_p")
    check_min_tokens(min_tokens_to_keep)
    check_filter_value(filter_value)
    work = work_dtype(logits)
    empty = check_row_max(work.amax(dim=1, keepdim=True))
    if not isinstance(mass, Tensor) and mass >= 1.0:
        return logits.clone()
    log_probs = work.log_softmax(dim=1)
    probs = log_probs.exp()
    entropy = -(log_probs * probs).nansum(dim=1, keepdim=True)
    closeness = -(log_probs.neg() - entropy).abs_()  # higher is more typical; -inf for impossible tokens
    closeness = closeness.masked_fill_(empty, NEG_INF)
    mass = broadcast_param(mass, logits, "typical_p", work.dtype)
    threshold = mass_threshold(closeness, probs.masked_fill(empty, 0.0), mass)
    if isinstance(mass, Tensor):
        threshold = threshold.masked_fill(mass >= 1.0, NEG_INF)
    keep = closeness >= threshold
    return _finish(logits, closeness, keep, min_tokens_to_keep, filter_value)


def epsilon_filter(logits: Tensor, epsilon: RowParam, *, min_tokens_to_keep: int = 1,
                   filter_value: float = NEG_INF) -> Tensor:
    """Epsilon sampling (Hewitt et al., 2022): keep tokens with probability ``>= epsilon`` (at least the top
    ``min_tokens_to_keep``). Same arithmetic as Hugging Face's ``EpsilonLogitsWarper``.

    Args:
        epsilon: a number or ``[B]`` tensor in ``[0, 1)``; ``0`` keeps everything.
    """
    check_logits(logits)
    epsilon = checked(epsilon, "epsilon")
    check_min_tokens(min_tokens_to_keep)
    check_filter_value(filter_value)
    work = work_dtype(logits)
    row_max = work.amax(dim=1, keepdim=True)
    check_row_max(row_max)
    if not isinstance(epsilon, Tensor) and epsilon == 0.0:
        return logits.clone()
    probs = work.softmax(dim=1)
    keep = probs >= broadcast_param(epsilon, logits, "epsilon", work.dtype)
    return _finish(logits, work, keep, min_tokens_to_keep, filter_value, always=True, row_max=row_max)


def eta_filter(logits: Tensor, epsilon: RowParam, *, min_tokens_to_keep: int = 1,
               filter_value: float = NEG_INF) -> Tensor:
    """Eta sampling (Hewitt et al., 2022): keep tokens with probability ``>= eta``, where
    ``eta = min(epsilon, sqrt(epsilon) * exp(-H))`` and ``H`` is the entropy of the row (at least the top
    ``min_tokens_to_keep``). Same tokens as Hugging Face's ``EtaLogitsWarper`` up to float rounding of ``H``.

    Args:
        epsilon: a number or ``[B]`` tensor in ``[0, 1)``; ``0`` keeps everything.
    """
    check_logits(logits)
    epsilon = checked(epsilon, "eta")
    check_min_tokens(min_tokens_to_keep)
    check_filter_value(filter_value)
    work = work_dtype(logits)
    row_max = work.amax(dim=1, keepdim=True)
    check_row_max(row_max)
    if not isinstance(epsilon, Tensor) and epsilon == 0.0:
        return logits.clone()
    probs = work.softmax(dim=1)
    entropy = -torch.special.xlogy(probs, probs).sum(dim=1, keepdim=True)
    epsilon = broadcast_param(epsilon, logits, "eta", work.dtype)
    epsilon = torch.as_tensor(epsilon, dtype=work.dtype, device=work.device)
    eta = torch.minimum(epsilon, epsilon.sqrt() * torch.exp(-entropy))
    keep = probs >= eta
    return _finish(logits, work, keep, min_tokens_to_keep, filter_value, always=True, row_max=row_max)


def top_h_filter(logits: Tensor, alpha: RowParam, *, rule: str = "paper", top_n: int | None = None,
                 min_tokens_to_keep: int = 1, filter_value: float = NEG_INF) -> Tensor:
    """Top-H (Potraghloo et al., NeurIPS 2025, "bounded entropy"): keep the most probable tokens, in decreasing
    probability, while an entropy budget of ``alpha * H(p)`` holds.

    Two stopping rules (the set is always a prefix of the sorted distribution, the top token always kept):

    * ``"paper"`` (default), the paper's rule: add tokens while the entropy of the *renormalised* kept
      distribution, ``H(q_S)`` with ``q_S = p_S / p(S)``, stays ``<= alpha * H(p)``. This entropy never
      decreases as tokens are added in decreasing probability, so the set is the longest such prefix.
    * ``"reference"``, the authors' code and Hugging Face's ``TopHLogitsWarper``: add tokens while the
      *unnormalised* partial sum ``sum_S -p log p`` stays ``<= alpha * H(p)``. As
      ``H(q_S) = sum_S(-p log p) / p(S) + log p(S)``, it is a different (usually smaller) set.

    ``p`` is the row's distribution, or with ``top_n`` its ``top_n`` most probable tokens renormalised (the
    authors and Hugging Face use ``top_n = 100``). With ``rule="reference", top_n=100`` the tokens are the ones
    ``TopHLogitsWarper(alpha)`` keeps (ties kept together).

    Args:
        alpha: a number or ``[B]`` tensor in ``(0, 1]``.
        rule: ``"paper"`` or ``"reference"``.
        top_n: ``None`` (the whole vocabulary, exact) or an int ``>= 1``.
    """
    check_logits(logits)
    alpha = checked(alpha, "top_h")
    check_top_h_options(rule, top_n)
    check_min_tokens(min_tokens_to_keep)
    check_filter_value(filter_value)
    work = work_dtype(logits)
    vocab = logits.shape[1]
    alpha = torch.as_tensor(broadcast_param(alpha, logits, "top_h", torch.float64), dtype=torch.float64,
                            device=work.device)
    if top_n is not None:
        values = work.topk(min(top_n, vocab), dim=1).values
        empty = check_row_max(values[:, :1])  # topk puts NaN first, like +inf
        count = _top_h_count(values, None, alpha, rule, exact_reference=True)
    else:
        row_max = work.amax(dim=1, keepdim=True)
        empty = check_row_max(row_max)
        log_probs = work.double().log_softmax(dim=1)
        probs = log_probs.exp()
        budget = -torch.special.xlogy(probs, probs).sum(dim=1, keepdim=True)
        log_norm = row_max.double() - log_probs.amax(dim=1, keepdim=True)  # log-sum-exp of the row
        candidates = min(vocab, 128)
        while True:  # widen the candidate list until every row stopped inside it
            values = work.topk(candidates, dim=1).values
            count = _top_h_count(values.double() - log_norm, budget, alpha, rule, exact_reference=False)
            if candidates == vocab or not bool((count == candidates).any()):
                break
            candidates = min(vocab, 4 * candidates)
    threshold = values.gather(1, count - 1).masked_fill_(empty, NEG_INF)
    return _finish(logits, work, work >= threshold, min_tokens_to_keep, filter_value)


# Relative slack on the entropy budget: the kept set's entropy is a running sum and the budget a full sum of the
# same float64 terms, which round differently (by far less than this over any vocabulary); without it alpha = 1
# would drop a tail token on a coin flip.
_TOP_H_SLACK = 1e-9


def _top_h_count(values: Tensor, entropy: Tensor | None, alpha: Tensor, rule: str,
                 exact_reference: bool) -> Tensor:
    """``[B, 1]`` number of leading candidates Top-H keeps.

    ``values``: ``[B, n]`` candidate logits, sorted descending; they are float64 log-probabilities when
    ``entropy`` (``[B, 1]`` float64, the entropy of the whole distribution) is given, else they are renormalised
    among themselves. ``alpha``: float64, a number or ``[B, 1]``.

    Apart from Hugging Face's own arithmetic (``rule="reference"`` with ``exact_reference``), the count is
    computed in float64 with a relative slack of ``_TOP_H_SLACK`` on the budget. Below ``alpha = 1`` it never
    runs over a token whose probability underflows to 0: such a token adds no entropy in floating point, though
    it does in exact arithmetic, so an extremely peaked row would otherwise keep its whole vocabulary. At
    ``alpha = 1`` the whole distribution meets the budget exactly, so every token is kept.
    """
    if entropy is None:
        if exact_reference and rule == "reference":
            # Hugging Face's arithmetic, step for step, so the same tokens on the same logits.
            distribution = torch.distributions.Categorical(logits=values, validate_args=False)
            probs = distribution.probs
            entropy = distribution.entropy()[:, None]
            terms = -probs * torch.log(probs)
            return _prefix_count(terms.cumsum(dim=1) <= alpha.to(probs.dtype) * entropy)
        log_probs = values.double().log_softmax(dim=1)
        probs = log_probs.exp()
        entropy = -torch.special.xlogy(probs, probs).sum(dim=1, keepdim=True)
    else:
        probs = values.exp()
    budget = alpha * entropy * (1 + _TOP_H_SLACK)
    partial_entropy = -torch.special.xlogy(probs, probs).cumsum(dim=1)
    if rule == "reference":
        holds = partial_entropy <= budget
    else:
        kept_mass = probs.cumsum(dim=1).clamp_min(torch.finfo(probs.dtype).tiny)
        holds = partial_entropy / kept_mass + kept_mass.log() <= budget
    return _prefix_count(holds & ((probs > 0) | (alpha >= 1)))


def _prefix_count(holds: Tensor) -> Tensor:
    """``[B, 1]`` length of the leading run of True in each row, at least 1."""
    return holds.long().cumprod(dim=1).sum(dim=1, keepdim=True).clamp_(min=1)


def _finish(logits: Tensor, ranking: Tensor, keep: Tensor, min_tokens_to_keep: int, filter_value: float,
            always: bool = False, row_max: Tensor | None = None) -> Tensor:
    """Add the ``min_tokens_to_keep`` best tokens by ``ranking`` (ties included) to ``keep``, then fill the
    rest. ``always``: the method can drop every token, so the best one is added even for ``min_tokens = 1``.
    ``row_max``: ``ranking``'s row maxima, if already computed."""
    if min_tokens_to_keep > 1 or always:
        count = min(min_tokens_to_keep, ranking.shape[1])
        if count == 1:
            best = row_max if row_max is not None else ranking.amax(dim=1, keepdim=True)
        else:
            best = ranking.topk(count, dim=1).values[:, -1:]
        keep = keep | (ranking >= best)
    return torch.where(keep, logits, filter_value)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face-compatible processors
# ----------------------------------------------------------------------------------------------------------------


class _TruncationFilter(LogitsFilter):
    _param_name: str
    _function = None

    def __init__(self, value: RowParam, min_tokens_to_keep: int = 1, filter_value: float = NEG_INF) -> None:
        setattr(self, self._param_name, checked(value, self._param_name))
        self.min_tokens_to_keep = check_min_tokens(min_tokens_to_keep)
        self.filter_value = check_filter_value(filter_value)

    def apply(self, scores: Tensor) -> Tensor:
        return type(self)._function(scores, getattr(self, self._param_name), min_tokens_to_keep=self.min_tokens_to_keep,
                                    filter_value=self.filter_value)


class TopKFilter(_TruncationFilter):
    """Processor form of :func:`top_k_filter` (``TopKFilter(50)``, or a ``[B]`` tensor of ``k``)."""

    _param_name = "top_k"
    _function = top_k_filter


class TopPFilter(_TruncationFilter):
    """Processor form of :func:`top_p_filter`."""

    _param_name = "top_p"
    _function = top_p_filter


class MinPFilter(_TruncationFilter):
    """Processor form of :func:`min_p_filter`."""

    _param_name = "min_p"
    _function = min_p_filter


class TypicalFilter(_TruncationFilter):
    """Processor form of :func:`typical_filter`."""

    _param_name = "typical_p"
    _function = typical_filter


class EpsilonFilter(_TruncationFilter):
    """Processor form of :func:`epsilon_filter`."""

    _param_name = "epsilon"
    _function = epsilon_filter


class EtaFilter(_TruncationFilter):
    """Processor form of :func:`eta_filter`."""

    _param_name = "eta"
    _function = eta_filter


class TopHFilter(LogitsFilter):
    """Processor form of :func:`top_h_filter` (``TopHFilter(0.4)``, ``TopHFilter(0.4, rule="reference",
    top_n=100)``)."""

    def __init__(self, alpha: RowParam, rule: str = "paper", top_n: int | None = None, min_tokens_to_keep: int = 1,
                 filter_value: float = NEG_INF) -> None:
        self.alpha = checked(alpha, "top_h")
        self.rule, self.top_n = check_top_h_options(rule, top_n)
        self.min_tokens_to_keep = check_min_tokens(min_tokens_to_keep)
        self.filter_value = check_filter_value(filter_value)

    def apply(self, scores: Tensor) -> Tensor:
        return top_h_filter(scores, self.alpha, rule=self.rule, top_n=self.top_n,
                            min_tokens_to_keep=self.min_tokens_to_keep, filter_value=self.filter_value)
