"""λ per module by type-II maximum likelihood: the evidence of BMM's Bayesian linear regression.

The regression behind ``U = (B + λ_abs·U0)(G + λ_abs·I)⁻¹`` (paper Eq. 4-7): for one module and each output row
``j``, every task t contributes observations ``(x, y_j = u_tj·x)`` for inputs ``x`` of that task (data-assisted:
the expert's activations, ``G_t = Σ x xᵀ``; data-free: the rows of ``U_t`` themselves, ``G_t = U_tᵀU_t``). With a
row prior ``w ~ N(u0_j, α⁻¹I)`` and noise ``N(0, β⁻¹)`` the MAP row is the formula above with
``λ_abs = α/β``, and the evidence ``p(y) = N(y; X u0_j, β⁻¹I + α⁻¹XXᵀ)`` has a closed form in the
eigen-decomposition ``G = QΛQᵀ``:

    log p = -½ Σ_j [ N log 2π - N log β + Σ_i log(1 + βΛ_i/α) + β·R_j(λ_abs) ]
    R(λ)  = Σ_j R_j = S - Σ_i c_i / (λ + Λ_i),   c_i = Σ_j Z_ji²,   Z = (B - U0·G)·Q,
    S     = Σ_t tr((U_t - U0) G_t (U_t - U0)ᵀ)   (the prior-mean residual energy)

``R(λ)`` is the minimised MAP objective. Maximising over β (``β* = d_out·N / R``) leaves, per output row,

    f(λ) = -½ [ N·log R(λ) + Σ_i log(1 + Λ_i/λ) ]  + const,

and ``λ_ev = argmax f``. Everything is invariant to BMM's relative units (``Ĝ = G/m``, ``B̂ = B/m``, ``Ŝ = S/m``,
``λ = λ_abs/m``): ``log R`` only shifts by ``log m``. So the rule works on exactly the cached ``Λ̂`` (eigenvalues of
Ĝ), ``B̂Q``, ``U0Q`` plus one scalar ``Ŝ`` per module. ``N`` is the number of observations per row: ``T·d_out`` for
the data-free Gram; for the data Gram (each ``G_t`` a per-token mean) the number of calibration tokens is what the
model assumes, see :func:`default_num_obs`.

The sums are fp64; :func:`free_spectra` runs its GEMMs and eigensolver in fp32 at large sizes (see there).
:func:`log_evidence_dense` is the brute-force Gaussian density the tests compare against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .defaults import DEFAULT_LAM
from .errors import InputError, NumericError

Tensor = torch.Tensor

LAM_RANGE = (1e-6, 1e2)  # relative λ searched by evidence_lam (log grid, then a golden-section refinement)
GRID_POINTS = 97
# Below this relative λ the solve is dominated by the rounding of the stored fp32 statistics (about 1e-7·λ_max in
# Ĝ's null space, amplified by 1/λ): an evidence maximum there is not identifiable (see fill_degenerate).
LAM_FLOOR = 1e-5
# free_spectra: eigen-decompositions of this size and above run in fp32 (precision="auto"); a primal-side fp32
# spectrum whose least-squares residual R(0) is below FP32_MIN_R0·Ŝ is recomputed in fp64
FP32_MIN_SIDE = 2048
FP32_MIN_R0 = 1e-3  # fp32 puts R(0) off by up to 4e-4·Ŝ where it is 0 (T·d_out = d_in)
_R_FLOOR = 1e-12  # R(λ) is floored at this fraction of S (R(0) = 0 only when one W fits every task exactly)


@dataclass
class Spectrum:
    """What the evidence of one module depends on, in relative units (fp64)."""

    lam: Tensor  # [d] eigenvalues of Ĝ (clamped at 0)
    c: Tensor  # [d] Σ_j Z_ji², Z = (B̂ - U0·Ĝ)Q
    S: float  # Ŝ = S/m
    n_obs: float  # observations per output row (N)
    key: str = "<module>"
    # [d] or None: when given, R(λ) = Σ e_i·λ/(λ+Λ_i), the same residual as Ŝ - Σ c_i/(λ+Λ_i) without the
    # difference (free_spectra's dual side, where Ŝ = Σ e_i and c_i = Λ_i·e_i)
    e: Tensor | None = None
    # below this λ the spectrum's rounding matters (fp32: eigenvalue errors of about √n·ε₃₂·Λ_max; fp64: 0)
    lam_floor: float = 0.0


def _f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(dtype=torch.float64)


def spectrum_from_factors(lam: Tensor, BQ: Tensor, U0Q: Tensor | None, S_hat: float, n_obs: float, *,
                          key: str = "<module>") -> Spectrum:
    """From the search cache of one module: eigenvalues Λ of Ĝ, ``B̂Q``, ``U0Q`` (None = zero anchor).

    The numerical rank is decided here, in fp64: eigenvalues below ``d·eps64·λ_max`` are rounding and count as 0
    (a rank-deficient Ĝ, ``T·d_out < d_in``, must not lend the evidence fake small eigenvalues)."""
    lam64 = _f64(lam).clamp_min(0.0)
    if lam64.numel():
        tol = lam64.numel() * torch.finfo(torch.float64).eps * float(lam64.max())
        lam64 = torch.where(lam64 > tol, lam64, torch.zeros_like(lam64))
    Z = _f64(BQ)
    if U0Q is not None:
        Z = Z - _f64(U0Q) * lam64  # (B̂ - U0Ĝ)Q = B̂Q - U0Q·diag(Λ)
    return _checked(Spectrum(lam64, (Z * Z).sum(0), float(S_hat), float(n_obs), key))


def spectrum(G_hat: Tensor, B_hat: Tensor, u0: Tensor | None, S_hat: float, n_obs: float, *,
             key: str = "<module>") -> Spectrum:
    """From the normalised statistics themselves (one fp64 eigh)."""
    G = _f64(G_hat)
    lam, Q = torch.linalg.eigh(0.5 * (G + G.T))
    BQ = _f64(B_hat) @ Q
    U0Q = None if u0 is None else _f64(u0) @ Q
    return spectrum_from_factors(lam, BQ, U0Q, S_hat, n_obs, key=key)


def _eigh(A: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``eigh`` of the symmetric ``A`` computed in ``dtype`` (scaled to unit max first); eigenvalues in fp64,
    eigenvectors in ``dtype``."""
    scale = float(A.abs().max())
    if scale == 0.0:
        return A.new_zeros(A.shape[0], dtype=torch.float64), torch.eye(A.shape[0], dtype=dtype, device=A.device)
    lam, Q = torch.linalg.eigh((A / scale).to(dtype))
    return lam.to(torch.float64) * scale, Q


def free_spectra(taus: Tensor, u0s: Sequence[Tensor | None], n_obs: float, *, key: str = "<module>",
                 precision: str = "auto") -> list[Spectrum]:
    """The evidence :class:`Spectrum` of the data-free Gram for each anchor in ``u0s`` (None: a zero anchor),
    straight from the task vectors ``[T, d_out, d_in]`` with one eigen-decomposition of the smaller side; the same
    as ``spectrum(*free_stats(taus), u0, residual_energy(taus, None, u0, m), n_obs)`` for each.

    With ``X`` the stacked task vectors ``[T·d_out, d_in]``, ``D_t = U_t - U0``, ``m = ‖X‖²/d_in``, ``Ĝ = XᵀX/m``
    and ``M = B̂ - U0Ĝ = Σ_t D_t G_t/m``:

    * ``T·d_out < d_in`` (k/v and down projections): Ĝ has rank ≤ ``T·d_out`` and shares its nonzero spectrum
      with ``K = XXᵀ/m = WΣWᵀ``; M's rows lie in X's row space, ``M = CX`` with ``C = [D_1U_1ᵀ … D_TU_Tᵀ]/m``.
      With ``e_j = m·‖Cw_j‖²``: Λ = σ (padded with exact zeros to ``d_in``), ``c_j = σ_j·e_j``, ``Ŝ = m·‖C‖²``,
      and the residual takes the cancellation-free form ``R(λ) = Σ_j e_j·λ/(λ+σ_j)`` (:attr:`Spectrum.e`): it
      is the difference ``Ŝ - Σ c_j/(λ+σ_j)`` with ``Ŝ = Σ e_j``, which at small λ, where one W fits every
      task, subtracts two nearly equal numbers;
    * otherwise ``Ĝ = QΛQᵀ`` itself, ``c = ‖MQ‖²`` per column and ``Ŝ = Σ_t⟨D_tG_t, D_t⟩/m``.

    ``precision``: ``float64``, ``float32`` or ``auto`` (fp32 where the eigen-decomposition has ``n ≥``
    :data:`FP32_MIN_SIDE`, fp64 below). fp32 runs the GEMMs and the eigensolver on the scaled matrices in fp32
    and accumulates every sum in fp64: about 2x faster at 8B shapes (bench/results/shapes_8b_evidence_fp32_cpu.md)
    and λ within ~1e-4 relative of the fp64 route there. Its eigenvalues carry an absolute error of about
    ``ε₃₂·Λ_max``, which only the difference form of ``R(λ)`` amplifies: the dual side never uses it, and the
    primal side (``T·d_out ≥ d_in``) falls back to fp64 when its least-squares residual ``R(0)`` is below
    :data:`FP32_MIN_R0` of Ŝ. The numerical rank is decided as in :func:`spectrum_from_factors` (eigenvalues ≤
    ``d_in·ε·Λ_max`` are zeros, ε of the precision used). Cost: one eigh of size ``min(T·d_out, d_in)`` and GEMMs
    of ``O(T·d_out·d_in·min(T·d_out, d_in))``; no ``[d_in, d_in]`` matrix where ``T·d_out < d_in``."""
    if taus.dim() != 3:
        raise InputError(f"{key}: task vectors must be [T, d_out, d_in], got {tuple(taus.shape)}")
    if precision not in ("auto", "float32", "float64"):
        raise InputError(f"{key}: evidence precision must be auto, float32 or float64, not {precision!r}")
    T, d_out, d_in = taus.shape
    small = min(T * d_out, d_in)
    fp32 = precision == "float32" or (precision == "auto" and small >= FP32_MIN_SIDE)
    wd = torch.float32 if fp32 else torch.float64
    U = taus.detach().to(dtype=wd)
    X = U.reshape(T * d_out, d_in)
    m = float(X.square().sum(dtype=torch.float64)) / d_in if d_in else 0.0
    given = list(u0s)
    u0s = [None if u0 is None else u0.detach().to(dtype=wd) for u0 in given]
    if m <= 0:
        return [_checked(Spectrum(taus.new_zeros(d_in, dtype=torch.float64), taus.new_zeros(d_in, dtype=torch.float64),
                                  0.0, float(n_obs), key)) for _ in u0s]
    eps = torch.finfo(wd).eps
    if T * d_out < d_in:
        out = _dual_spectra(U, X, u0s, m, d_in, eps)
    else:
        out = _primal_spectra(U, u0s, m, d_in, eps)
        if fp32 and any(S > 0 and S - float((c[lam > 0] / lam[lam > 0]).sum()) < FP32_MIN_R0 * S
                        for lam, c, S, _ in out):
            return free_spectra(taus, given, n_obs, key=key, precision="float64")
    floor = math.sqrt(small) * eps * max(float(lam.max()) for lam, *_ in out) if fp32 else 0.0
    return [_checked(Spectrum(lam, c, max(S, 0.0), float(n_obs), key, e, floor)) for lam, c, S, e in out]


def free_lams(taus: Tensor, u0s: Sequence[Tensor | None], n_obs: float, *, key: str = "<module>",
              lam_range: tuple[float, float] = LAM_RANGE, precision: str = "auto") -> list[float | None]:
    """The data-free evidence λ for each anchor in ``u0s`` (None where the module has no evidence), from
    :func:`free_spectra`. A λ found on an fp32 spectrum within 10× of its :attr:`Spectrum.lam_floor`, where fp32's
    eigenvalue errors reach the terms that decide it, is recomputed in fp64."""
    sps = free_spectra(taus, u0s, n_obs, key=key, precision=precision)
    lams = [evidence_lam(sp, lam_range) if has_evidence(sp) else None for sp in sps]
    if any(lam is not None and lam < 10 * sp.lam_floor for lam, sp in zip(lams, sps)):
        return free_lams(taus, u0s, n_obs, key=key, lam_range=lam_range, precision="float64")
    return lams


def _rank_cut(lam: Tensor, d_in: int, eps: float) -> Tensor:
    """True where an eigenvalue counts: above ``d_in·ε₆₄·Λ_max`` in fp64 (as :func:`spectrum_from_factors`), above
    ``√n·ε₃₂·Λ_max`` in fp32, the size of an fp32 eigensolver's error (``d_in·ε₃₂`` would cut real eigenvalues:
    at ``n = 4096`` it is 5e-4 of Λ_max)."""
    tol = d_in * eps if eps < 1e-10 else math.sqrt(lam.numel()) * eps
    return lam > tol * float(lam.max())


def _dual_spectra(U: Tensor, X: Tensor, u0s: list, m: float, d_in: int, eps: float) -> list[tuple]:
    K = (X @ X.mT) / m
    sig, W = _eigh(0.5 * (K + K.mT), K.dtype)
    del K
    sig = sig.clamp_min(0.0)
    keep = _rank_cut(sig, d_in, eps)
    sig = torch.where(keep, sig, 0.0)
    pad = sig.new_zeros(d_in - X.shape[0])
    lam = torch.cat([sig, pad])
    out = []
    for u0 in u0s:
        C = torch.cat([(u if u0 is None else u - u0) @ u.mT for u in U], 1) / m
        e = m * (C @ W.to(C.dtype)).to(torch.float64).square().sum(0)
        S = m * float(C.square().sum(dtype=torch.float64))
        del C
        out.append((lam, torch.cat([sig * e, pad]), S, torch.cat([e, pad])))
    return out


def _primal_spectra(U: Tensor, u0s: list, m: float, d_in: int, eps: float) -> list[tuple]:
    Gs = [u.mT @ u for u in U]
    G = sum(Gs)
    lam, Q = _eigh(0.5 * (G + G.mT) / m, G.dtype)
    del G
    lam = lam.clamp_min(0.0)
    keep = _rank_cut(lam, d_in, eps)
    lam = torch.where(keep, lam, 0.0)
    Qw = Q.to(U.dtype)
    out = []
    for u0 in u0s:
        M = U.new_zeros(U.shape[1], d_in)
        S = 0.0
        for u, Gt in zip(U, Gs):
            d = u if u0 is None else u - u0
            Et = d @ Gt
            M += Et
            S += float((Et * d).sum(dtype=torch.float64))
            del Et, d
        c = ((M / m) @ Qw).to(torch.float64).square().sum(0)
        out.append((lam, torch.where(keep, c, 0.0), S / m, None))
    return out


def _checked(sp: Spectrum) -> Spectrum:
    if not (math.isfinite(sp.S) and sp.S >= 0):
        raise NumericError(f"{sp.key}: residual energy Ŝ = {sp.S} must be a finite number ≥ 0")
    if not (math.isfinite(sp.n_obs) and sp.n_obs > 0):
        raise InputError(f"{sp.key}: number of observations N = {sp.n_obs} must be > 0")
    if not (bool(torch.isfinite(sp.lam).all()) and bool(torch.isfinite(sp.c).all())):
        raise NumericError(f"{sp.key}: NaN/Inf in the eigen-decomposition of Ĝ or in B̂Q/U0Q")
    return sp


def residual_energy(taus: Tensor | Sequence[Tensor], grams: Tensor | Sequence[Tensor] | None, u0: Tensor | None,
                    m: float, *, key: str = "<module>") -> float:
    """``Ŝ = Σ_t tr((U_t - U0) G_t (U_t - U0)ᵀ) / m``; ``grams=None`` means the data-free ``G_t = U_tᵀU_t``.

    ``m`` is the stage's normaliser ``tr(G)/d_in`` (0: no evidence, Ŝ = 0)."""
    if m <= 0:
        return 0.0
    items = list(taus.unbind(0)) if isinstance(taus, Tensor) else list(taus)
    gl = [None] * len(items) if grams is None else (list(grams.unbind(0)) if isinstance(grams, Tensor)
                                                    else list(grams))
    if len(gl) != len(items):
        raise InputError(f"{key}: {len(items)} task vectors but {len(gl)} Grams")
    total = 0.0
    for u, g in zip(items, gl):
        u = _f64(u)
        d = u if u0 is None else u - _f64(u0)
        if g is None:  # tr(D UᵀU Dᵀ) = ‖U Dᵀ‖²
            total += float((u @ d.T).square().sum())
        else:
            total += float(((d @ _f64(g)) * d).sum())
    return total / m


def log_evidence(lam: float | Tensor, sp: Spectrum) -> Tensor:
    """Profiled log-evidence per output row, ``-½[N log R(λ) + Σ log(1 + Λ_i/λ)]`` (constants dropped)."""
    lam_t = torch.as_tensor(lam, dtype=torch.float64).reshape(-1, 1)
    if bool((lam_t <= 0).any()):
        raise InputError(f"{sp.key}: λ must be > 0")
    if sp.e is None:
        R = sp.S - (sp.c / (lam_t + sp.lam)).sum(1)
    else:
        R = (sp.e * (lam_t / (lam_t + sp.lam))).sum(1)
    R = R.clamp_min(_R_FLOOR * max(sp.S, 1e-300))
    occ = torch.log1p(sp.lam / lam_t).sum(1)
    out = -0.5 * (sp.n_obs * torch.log(R) + occ)
    return out if torch.is_tensor(lam) and torch.as_tensor(lam).dim() > 0 else out.reshape(())


def has_evidence(sp: Spectrum) -> bool:
    """Whether the module's data say anything about λ: Ĝ ≠ 0 and the task vectors differ from the anchor. Without
    evidence (e.g. a module no expert changed) every λ explains the data equally well."""
    return bool(sp.lam.numel()) and float(sp.lam.max()) > 0 and sp.S > 0


def evidence_lam(sp: Spectrum, lam_range: tuple[float, float] = LAM_RANGE, points: int = GRID_POINTS) -> float:
    """``argmax_λ f(λ)`` over a log grid on ``lam_range``, refined by golden-section search in log λ."""
    lo, hi = lam_range
    if not (0 < lo < hi and math.isfinite(hi)):
        raise InputError(f"{sp.key}: λ range {lam_range} must satisfy 0 < lo < hi")
    if not has_evidence(sp):
        return hi  # no evidence: the anchor, i.e. the largest λ
    grid = torch.logspace(math.log10(lo), math.log10(hi), points, dtype=torch.float64)
    vals = log_evidence(grid, sp)
    i = int(torch.argmax(vals))
    a = math.log(grid[max(i - 1, 0)])
    b = math.log(grid[min(i + 1, points - 1)])
    g = (math.sqrt(5) - 1) / 2
    f = lambda x: float(log_evidence(torch.tensor([math.exp(x)], dtype=torch.float64), sp)[0])  # noqa: E731
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(40):
        if fc > fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return math.exp(0.5 * (a + b))


def default_num_obs(kind: str, num_tasks: int, d_out: int, tokens: float | None = None) -> float:
    """N of the evidence: data-free ``T·d_out`` (the rows of the task vectors are the inputs); data-assisted the
    calibration tokens of all tasks (the Gram stage records them), ``T·d_out`` when unknown."""
    if kind == "free" or tokens is None:
        return float(num_tasks * d_out)
    return float(tokens)


def log_evidence_dense(X: Tensor, Y: Tensor, U0: Tensor | None, alpha: float, beta: float) -> float:
    """Brute force ``Σ_j log N(y_j; X u0_j, β⁻¹I + α⁻¹XXᵀ)``: inputs X [N, d], targets Y [N, d_out]."""
    X, Y = _f64(X), _f64(Y)
    n = X.shape[0]
    C = torch.eye(n, dtype=torch.float64) / beta + (X @ X.T) / alpha
    mean = torch.zeros_like(Y) if U0 is None else X @ _f64(U0).T
    dist = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64), covariance_matrix=C)
    return float(dist.log_prob((Y - mean).T).sum())


def fill_degenerate(lams: dict[str, float], lam_range: tuple[float, float] = LAM_RANGE) -> dict[str, float]:
    """Modules whose evidence peaks at the lower end of the range, or below :data:`LAM_FLOOR`, get the median λ of
    the others.

    Seen on SmolLM2's data-free k/v projections (``T·d_out < d_in``: one W can fit every task exactly, so
    ``R(λ) → 0`` as ``λ → 0``): the noise estimate collapses and the evidence has no interior maximum, λ is not
    identifiable from that module alone (not every interpolating module collapses: it depends on its spectrum).
    With no identifiable module at all, the
    default λ (bmm_cli/defaults.py) is used."""
    low = max(lam_range[0] * 1.01, LAM_FLOOR)
    ok = sorted(v for v in lams.values() if v > low)
    fill = ok[len(ok) // 2] if ok else DEFAULT_LAM
    return {k: (v if v > low else fill) for k, v in lams.items()}
