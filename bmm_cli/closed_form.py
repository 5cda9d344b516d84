"""The per-module closed forms of Bayesian Model Merging (docs/math.md) and the cached-eigenbasis trial math.

Pure tensor math: no files, no CLI. Orientation is ``nn.Linear``'s: a weight is ``[d_out, d_in]``; the T task
vectors of one module are ``U_t = W_t - W_pre``, stacked ``[T, d_out, d_in]`` or given as a sequence of 2-D tensors.

Where λ enters the math (one search finds it): ``U = (B̂ + λ·U0)(Ĝ + λ·I)⁻¹``

* data-free (paper Eq. 15): ``G = Σ U_tᵀU_t``, ``B = Σ U_t U_tᵀ U_t``            -> :func:`free_stats`
* data-assisted (Eq. 8):    ``G = Σ G_t``,     ``B = Σ U_t G_t``                 -> :func:`data_stats`
* relative λ: ``Ĝ = G/m``, ``B̂ = B/m``, ``m = tr(G)/d_in`` (so Ĝ has mean eigenvalue 1)
* hybrid (App. F): ``Ĝ = ε Ĝ_data + (1-ε) Ĝ_free``, ``B̂`` likewise                -> :func:`hybrid_stats`
* one solve: Cholesky of the symmetrised ``Ĝ + λI``                               -> :func:`solve_direct`
* many λ: ``Ĝ = QΛQᵀ`` once, then ``U = ((B̂Q + λ·U0Q)·diag(1/(Λ+λ)))Qᵀ``, one GEMM -> :func:`factorize`,
  :func:`apply_factors`, and :class:`~bmm_cli.trial_solver.TrialSolver` for a whole model.

Conventions:

* ``U0 = None`` means the zero anchor (the "pretrained" anchor); it costs no memory in the cache.
* Accumulation is fp32 (fp64 when the input is fp64). Every function takes ``key=`` (the module's
  checkpoint key) and names it in every error, which is one line: :class:`InputError` for bad shapes or
  options, :class:`NumericError` for NaN/Inf or an ill-posed system. Nothing returns NaN silently.
* ``m == 0`` (every task vector, or every data Gram, is zero): there is no evidence, so the stats are
  ``Ĝ = 0``, ``B̂ = 0``, ``m = 0`` and every solve returns ``U = λU0(λI)⁻¹ = U0``: the anchor. No division
  by zero happens anywhere.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence, Union

import torch

from .errors import InputError, NumericError

Tensor = torch.Tensor
TaskVectors = Union[Tensor, Sequence[Tensor]]

__all__ = [
    "GramStats",
    "ModuleFactors",
    "apply_factors",
    "data_stats",
    "eig_gram",
    "factorize",
    "free_stats",
    "hybrid_stats",
    "solve_direct",
    "solve_hybrid_trial",
]

# An eigenvalue of Ĝ below -NEG_EIG_REL·λ_max is not rounding noise: Ĝ is then not a Gram matrix (a corrupt
# or mis-oriented input) and we refuse it instead of clamping it away. Rounding in fp32 eigh is ~1e-6·λ_max.
NEG_EIG_REL = 1e-3

_COMPUTE_MODES = ("fp32", "tf32", "bf16")


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


@dataclass
class GramStats:
    """Normalised sufficient statistics of one module: ``Ĝ = G/m`` [d_in, d_in], ``B̂ = B/m`` [d_out, d_in].

    ``m = tr(G)/d_in`` is kept for reporting (and is 0 when there is no evidence, see the module doc).
    """

    G_hat: Tensor
    B_hat: Tensor
    m: float

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.B_hat.shape)  # type: ignore[return-value]

    def to(self, device=None, dtype=None) -> "GramStats":
        return GramStats(self.G_hat.to(device=device, dtype=dtype), self.B_hat.to(device=device, dtype=dtype), self.m)

    def tensors(self, key: str) -> dict[str, Tensor]:
        """Flat ``{name: tensor}`` for a safetensors shard (``key.G_hat``, ``key.B_hat``, ``key.m``)."""
        return {
            f"{key}.G_hat": self.G_hat.contiguous(),
            f"{key}.B_hat": self.B_hat.contiguous(),
            f"{key}.m": torch.tensor([self.m], dtype=torch.float64),
        }

    @classmethod
    def from_tensors(cls, key: str, tensors: Mapping[str, Tensor]) -> "GramStats":
        try:
            return cls(tensors[f"{key}.G_hat"], tensors[f"{key}.B_hat"], float(tensors[f"{key}.m"].reshape(-1)[0]))
        except KeyError as exc:
            raise InputError(f"{key}: Gram statistics incomplete (missing {exc.args[0]})") from None


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _as_list(taus: TaskVectors, key: str) -> list[Tensor]:
    if isinstance(taus, Tensor):
        if taus.dim() != 3:
            raise InputError(f"{key}: task vectors must be [T, d_out, d_in], got shape {tuple(taus.shape)}")
        items = list(taus.unbind(0))
    else:
        items = list(taus)
    if not items:
        raise InputError(f"{key}: no task vectors (T = 0)")
    shape = tuple(items[0].shape)
    for i, u in enumerate(items):
        if u.dim() != 2 or tuple(u.shape) != shape:
            raise InputError(f"{key}: task vector {i} has shape {tuple(u.shape)}, expected a 2-D {shape}")
    return items


def _normalise(G: Tensor, B: Tensor, key: str, what: str) -> GramStats:
    d_in = G.shape[0]
    m = float(torch.diagonal(G).sum()) / d_in
    if not math.isfinite(m):
        raise NumericError(f"{key}: {what} Gram has a non-finite trace (NaN/Inf in the inputs)")
    if m < 0:
        raise NumericError(f"{key}: {what} Gram has a negative trace {m:.3g}: not a Gram matrix")
    if m <= torch.finfo(G.dtype).tiny:
        # No evidence at all: Ĝ = B̂ = 0 makes every solve return the anchor U0 (see the module doc).
        return GramStats(torch.zeros_like(G), torch.zeros_like(B), 0.0)
    if not bool(torch.isfinite(B).all()):
        raise NumericError(f"{key}: {what} statistic B has NaN/Inf (check the task vectors)")
    return GramStats(G / m, B / m, m)


def free_stats(taus: TaskVectors, *, key: str = "<module>", device: torch.device | str | None = None) -> GramStats:
    """Data-free statistics: ``G = Σ U_tᵀU_t``, ``B = Σ U_t U_tᵀ U_t``, normalised by ``m = tr(G)/d_in``.

    ``taus`` may stay on the host; with ``device`` each ``U_t`` is moved there one at a time.
    B uses the cheaper association per shape: ``U_t G_t`` reuses the ``G_t`` that G needs anyway
    (extra ``d_out·d_in²``), ``(U_t U_tᵀ)U_t`` costs ``2·d_out²·d_in``; the first is used when
    ``d_in <= 2·d_out``.
    """
    items = _as_list(taus, key)
    d_out, d_in = items[0].shape
    dev = torch.device(device) if device is not None else items[0].device
    acc = _acc_dtype(items[0])
    G = torch.zeros(d_in, d_in, dtype=acc, device=dev)
    B = torch.zeros(d_out, d_in, dtype=acc, device=dev)
    reuse_g = d_in <= 2 * d_out
    for u in items:
        u = u.to(device=dev, dtype=acc)
        Gt = u.mT @ u
        G += Gt
        if reuse_g:
            B.addmm_(u, Gt)
        else:
            B.addmm_(u @ u.mT, u)
        del Gt
    return _normalise(G, B, key, "data-free")


def data_stats(
    taus: TaskVectors, grams: Tensor | Sequence[Tensor], *, key: str = "<module>", device=None
) -> GramStats:
    """Data-assisted statistics: ``G = Σ G_t``, ``B = Σ U_t G_t`` (``G_t`` = mean ``x xᵀ`` of expert t's inputs)."""
    items = _as_list(taus, key)
    d_out, d_in = items[0].shape
    gl = list(grams.unbind(0)) if isinstance(grams, Tensor) and grams.dim() == 3 else list(grams)
    if len(gl) != len(items):
        raise InputError(f"{key}: {len(items)} task vectors but {len(gl)} data Grams")
    for i, g in enumerate(gl):
        if tuple(g.shape) != (d_in, d_in):
            raise InputError(f"{key}: data Gram {i} has shape {tuple(g.shape)}, expected ({d_in}, {d_in})")
    dev = torch.device(device) if device is not None else items[0].device
    acc = torch.float64 if (items[0].dtype == torch.float64 or gl[0].dtype == torch.float64) else torch.float32
    G = torch.zeros(d_in, d_in, dtype=acc, device=dev)
    B = torch.zeros(d_out, d_in, dtype=acc, device=dev)
    for u, g in zip(items, gl):
        g = g.to(device=dev, dtype=acc)
        G += g
        B.addmm_(u.to(device=dev, dtype=acc), g)
    return _normalise(G, B, key, "data")


def hybrid_stats(free: GramStats, data: GramStats, eps: float, *, key: str = "<module>") -> GramStats:
    """``Ĝ = ε Ĝ_data + (1-ε) Ĝ_free``, ``B̂`` likewise (App. F); ``m`` is the same mix (for reporting only)."""
    eps = float(eps)
    if not 0.0 <= eps <= 1.0:
        raise InputError(f"{key}: hybrid ε must lie in [0, 1], got {eps}")
    if free.G_hat.shape != data.G_hat.shape or free.B_hat.shape != data.B_hat.shape:
        raise InputError(
            f"{key}: data-free stats {tuple(free.B_hat.shape)} and data stats {tuple(data.B_hat.shape)} differ in shape"
        )
    dt = torch.promote_types(free.G_hat.dtype, data.G_hat.dtype)
    G = torch.lerp(free.G_hat.to(dt), data.G_hat.to(device=free.G_hat.device, dtype=dt), eps)
    B = torch.lerp(free.B_hat.to(dt), data.B_hat.to(device=free.B_hat.device, dtype=dt), eps)
    return GramStats(G, B, eps * data.m + (1.0 - eps) * free.m)


# ---------------------------------------------------------------------------------------------------------
# One solve (Cholesky)
# ---------------------------------------------------------------------------------------------------------


def _check_lam(lam: float, key: str) -> float:
    lam = float(lam)
    if not (lam > 0.0 and math.isfinite(lam)):
        raise InputError(f"{key}: λ must be a finite number > 0, got {lam}")
    return lam


def _check_shapes(G_hat: Tensor, B_hat: Tensor, U0: Tensor | None, key: str) -> None:
    if G_hat.dim() != 2 or G_hat.shape[0] != G_hat.shape[1]:
        raise InputError(f"{key}: Ĝ must be square, got {tuple(G_hat.shape)}")
    if B_hat.dim() != 2 or B_hat.shape[1] != G_hat.shape[0]:
        raise InputError(f"{key}: B̂ {tuple(B_hat.shape)} does not match Ĝ {tuple(G_hat.shape)} (want [d_out, d_in])")
    if U0 is not None and tuple(U0.shape) != tuple(B_hat.shape):
        raise InputError(f"{key}: anchor U0 {tuple(U0.shape)} does not match B̂ {tuple(B_hat.shape)}")


def _rhs(B_hat: Tensor, U0: Tensor | None, lam: float, dtype: torch.dtype) -> Tensor:
    R = B_hat.to(dtype)
    if U0 is not None:
        R = R + lam * U0.to(device=R.device, dtype=dtype)
    return R


def _solve_chol(G_hat: Tensor, R: Tensor, lam: float) -> Tensor | None:
    """``U`` with ``U (Ĝ+λI) = R`` via Cholesky; None when the factorization fails or the result is not finite."""
    A = 0.5 * (G_hat + G_hat.mT)
    A.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        return None
    # With Ĝ PSD every eigenvalue of A is >= λ, and so is every Cholesky pivot L_ii² (a diagonal entry of a Schur
    # complement). A pivot well below λ means Ĝ is not PSD at this resolution (rounding at this dtype, or a
    # negative eigenvalue near -λ): a "successful" factorization would then be nearly singular and return a
    # huge, finite, wrong U. Treat it as a failure (the caller retries in fp64, then clamps eigenvalues).
    if float(torch.diagonal(L).square().min()) < 0.5 * lam:
        return None
    # U A = R  <=>  A Uᵀ = Rᵀ (A symmetric): solve from the right by transposing.
    U = torch.cholesky_solve(R.mT, L).mT
    return U if bool(torch.isfinite(U).all()) else None


def _solve_eig(G_hat: Tensor, R: Tensor, lam: float) -> Tensor:
    """Last resort (fp64): eigendecomposition with negative eigenvalues clamped to 0."""
    evals, Q = torch.linalg.eigh(0.5 * (G_hat + G_hat.mT))
    evals = evals.clamp_min(0.0)
    return ((R @ Q) / (evals + lam)) @ Q.mT


def solve_direct(
    G_hat: Tensor,
    B_hat: Tensor,
    U0: Tensor | None,
    lam: float,
    *,
    key: str = "<module>",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``U = (B̂ + λU0)(Ĝ + λI)⁻¹`` by Cholesky on ``(Ĝ+Ĝᵀ)/2 + λI``.

    Computes in ``dtype`` (default: fp32, fp64 for fp64 inputs); retries in fp64 when the Cholesky fails or the
    result is not finite, then falls back to a clamped fp64 eigendecomposition; raises :class:`NumericError`
    naming ``key`` if the result is still not finite. Returns the compute dtype (fp32 or fp64).
    """
    lam = _check_lam(lam, key)
    _check_shapes(G_hat, B_hat, U0, key)
    dt = dtype or _acc_dtype(B_hat)
    U = _solve_chol(G_hat.to(dt), _rhs(B_hat, U0, lam, dt), lam)
    if U is None:
        G64, R64 = G_hat.to(torch.float64), _rhs(B_hat, U0, lam, torch.float64)
        U = _solve_chol(G64, R64, lam)
        if U is None:
            U = _solve_eig(G64, R64, lam)
        U = U.to(dt)
    if not bool(torch.isfinite(U).all()):
        raise NumericError(f"{key}: closed-form solve gave NaN/Inf at λ={lam:g} (check Ĝ, B̂ and the anchor)")
    return U


def solve_hybrid_trial(
    free: GramStats,
    data: GramStats,
    U0: Tensor | None,
    lam: float,
    eps: float,
    *,
    key: str = "<module>",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """One hybrid trial: ε changes Ĝ's eigenbasis, so no cache applies; a Cholesky solve per call."""
    h = hybrid_stats(free, data, eps, key=key)
    return solve_direct(h.G_hat, h.B_hat, U0, lam, key=key, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# Cached eigenbasis: one eigh per module, one GEMM per λ
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ModuleFactors:
    """``Ĝ = Q diag(evals) Qᵀ`` with ``BQ = B̂Q`` and ``U0Q = U0·Q`` (None for the zero anchor).

    ``Q``, ``BQ``, ``U0Q`` are stored in the factor dtype (fp32, bf16, fp16 or fp64); ``evals`` stays fp32/fp64.
    """

    Q: Tensor
    evals: Tensor
    BQ: Tensor
    U0Q: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.BQ.shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._present().values())

    def _present(self) -> dict[str, Tensor]:
        d = {"Q": self.Q, "evals": self.evals, "BQ": self.BQ}
        if self.U0Q is not None:
            d["U0Q"] = self.U0Q
        return d

    def to(self, device=None, *, non_blocking: bool = False) -> "ModuleFactors":
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return ModuleFactors(mv(self.Q), mv(self.evals), mv(self.BQ), mv(self.U0Q))

    def tensors(self, key: str) -> dict[str, Tensor]:
        """Flat ``{key.Q, key.evals, key.BQ[, key.U0Q]}`` for a safetensors cache shard."""
        return {f"{key}.{n}": t.contiguous() for n, t in self._present().items()}

    @classmethod
    def from_tensors(cls, key: str, tensors: Mapping[str, Tensor]) -> "ModuleFactors":
        try:
            return cls(tensors[f"{key}.Q"], tensors[f"{key}.evals"], tensors[f"{key}.BQ"], tensors.get(f"{key}.U0Q"))
        except KeyError as exc:
            raise InputError(f"{key}: cached factors incomplete (missing {exc.args[0]})") from None


def eig_gram(G_hat: Tensor, *, key: str = "<module>", dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``(Q, evals)`` of the symmetrised Ĝ in ``dtype``; retried in fp64 when eigh fails or is not finite.

    Negative eigenvalues within ``NEG_EIG_REL·λ_max`` of 0 are rounding and are clamped to 0; anything more
    negative means Ĝ is not a Gram matrix and raises :class:`NumericError`. Returns tensors in ``dtype``.
    Reusable across modules that share Ĝ (data-assisted q/k/v, gate/up share their input).
    """
    if G_hat.dim() != 2 or G_hat.shape[0] != G_hat.shape[1]:
        raise InputError(f"{key}: Ĝ must be square, got {tuple(G_hat.shape)}")
    if not bool(torch.isfinite(G_hat).all()):
        raise NumericError(f"{key}: Ĝ has NaN/Inf")

    def attempt(dt: torch.dtype) -> tuple[Tensor, Tensor] | None:
        A = G_hat.to(dt)
        A = 0.5 * (A + A.mT)
        try:
            evals, Q = torch.linalg.eigh(A)
        except RuntimeError:  # torch.linalg.LinAlgError: no convergence
            return None
        if not (bool(torch.isfinite(evals).all()) and bool(torch.isfinite(Q).all())):
            return None
        return evals, Q

    out = attempt(dtype)
    if out is None and dtype != torch.float64:
        out = attempt(torch.float64)
    if out is None:
        raise NumericError(f"{key}: eigendecomposition of Ĝ failed even in fp64")
    evals, Q = out
    top = float(evals.abs().max()) if evals.numel() else 0.0
    low = float(evals.min()) if evals.numel() else 0.0
    if low < -NEG_EIG_REL * top:
        raise NumericError(
            f"{key}: Ĝ has eigenvalue {low:.3g} (λ_max {top:.3g}); not positive semi-definite, so not a Gram matrix"
        )
    return Q.to(dtype), evals.clamp_min(0.0).to(dtype)


def factorize(
    G_hat: Tensor,
    B_hat: Tensor,
    U0: Tensor | None,
    *,
    dtype: torch.dtype = torch.float32,
    factor_dtype: torch.dtype | None = None,
    key: str = "<module>",
    eig: tuple[Tensor, Tensor] | None = None,
) -> ModuleFactors:
    """Cache for fast λ trials: ``Ĝ = QΛQᵀ`` (eigh in ``dtype``), ``BQ = B̂Q``, ``U0Q = U0·Q``.

    ``factor_dtype`` (default ``dtype``) is the storage dtype of Q, BQ, U0Q: bf16 halves the cache. ``eig=(Q,
    evals)`` from :func:`eig_gram` skips the eigh. Measured (bench/README.md, relative error of U vs fp64):
    bf16 storage ≈ 2.5e-3 at any λ, ten times below the bf16 rounding of the merged weight; eigh in fp32 gives
    2e-2 at λ = 1e-3 in rank-deficient modules (noise in Ĝ's null space amplified by 1/λ), eigh in fp64 1e-3.
    So for small λ build with ``dtype=torch.float64, factor_dtype=torch.bfloat16`` (a one-off cost).
    """
    _check_shapes(G_hat, B_hat, U0, key)
    if eig is None:
        Q, evals = eig_gram(G_hat, key=key, dtype=dtype)
    else:
        Q, evals = eig
        if tuple(Q.shape) != tuple(G_hat.shape) or evals.shape[0] != G_hat.shape[0]:
            raise InputError(f"{key}: shared eigenbasis {tuple(Q.shape)} does not match Ĝ {tuple(G_hat.shape)}")
        Q, evals = Q.to(dtype), evals.to(dtype).clamp_min(0.0)
    fd = factor_dtype or dtype
    BQ = B_hat.to(device=Q.device, dtype=dtype) @ Q
    U0Q = None if U0 is None else U0.to(device=Q.device, dtype=dtype) @ Q
    if not bool(torch.isfinite(BQ).all()) or (U0Q is not None and not bool(torch.isfinite(U0Q).all())):
        raise NumericError(f"{key}: B̂Q or U0Q has NaN/Inf (check B̂ and the anchor)")
    return ModuleFactors(Q.to(fd), evals, BQ.to(fd), None if U0Q is None else U0Q.to(fd))


@contextlib.contextmanager
def _matmul_precision(device: torch.device, compute: str) -> Iterator[None]:
    """TF32 for fp32 GEMMs on CUDA only while we compute (the global flag is restored afterwards)."""
    if compute != "tf32" or device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    try:  # torch >= 2.9 API; it refuses to mix with the legacy flag if someone else set that one
        old, attr, value = m.fp32_precision, "fp32_precision", "tf32"
        m.fp32_precision = value
    except (AttributeError, RuntimeError):
        old, attr, value = m.allow_tf32, "allow_tf32", True
        m.allow_tf32 = value
    try:
        yield
    finally:
        setattr(m, attr, old)


def _apply(Q: Tensor, evals: Tensor, BQ: Tensor, U0Q: Tensor | None, lam: float, compute: str) -> Tensor:
    """``((BQ + λ·U0Q) · 1/(Λ+λ)) Qᵀ`` in fp32 (fp64 for fp64 factors): one GEMM."""
    acc = torch.float64 if Q.dtype == torch.float64 else torch.float32
    inv = (evals.to(acc) + lam).reciprocal_()
    X = BQ.to(acc)
    if U0Q is not None:
        X = torch.add(X, U0Q.to(acc), alpha=lam)
    X = X.mul_(inv) if X is not BQ else X * inv
    if compute == "bf16" and acc == torch.float32:
        Xb, Qb = X.to(torch.bfloat16), Q.to(torch.bfloat16)
        if Q.device.type == "cuda":
            return (Xb @ Qb.mT).float()
        # CPU bf16 GEMMs are ~50x slower than fp32 ones; bf16 inputs with fp32 accumulation give the same numbers
        return Xb.float() @ Qb.float().mT
    return X @ Q.to(acc).mT


def apply_factors(f: ModuleFactors, lam: float, *, key: str = "<module>", compute: str = "fp32") -> Tensor:
    """``U`` for one λ from cached factors: one ``[d_out, d_in] × [d_in, d_in]`` GEMM.

    ``compute``: ``fp32`` (bf16 factors are upcast), ``tf32`` (fp32 with TF32 GEMM on CUDA), ``bf16``
    (bf16 GEMM inputs, fp32 accumulation). Returns fp32 (fp64 for fp64 factors); raises on NaN/Inf.
    """
    lam = _check_lam(lam, key)
    if compute not in _COMPUTE_MODES:
        raise InputError(f"{key}: compute must be one of {', '.join(_COMPUTE_MODES)}, got {compute!r}")
    with _matmul_precision(f.Q.device, compute):
        U = _apply(f.Q, f.evals, f.BQ, f.U0Q, lam, compute)
    if not bool(torch.isfinite(U).all()):
        raise NumericError(f"{key}: cached solve gave NaN/Inf at λ={lam:g}")
    return U

