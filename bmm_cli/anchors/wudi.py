"""``wudi``: WUDI-merging (Cheng et al. 2025, "Whoever Started the Interference Should End It: Guiding Data-Free
Model Merging via Task Vectors"), per 2-D module in the ``[d_out, d_in]`` orientation (the loss is not
transpose-invariant; Conv1D weights must be transposed first).

    L(τ_m) = Σ_t ‖(τ_m − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F,     τ_m ← Σ_t τ_t,   Adam(lr = 1e-5), 300 steps, float32.

Closed-form gradient, instead of autograd through T products of size d_out×d_out:

    ∇L = 2 (τ_m A − C),   A = Σ_t τ_tᵀ τ_t / n_t   [d_in, d_in],   C = Σ_t τ_t τ_tᵀ τ_t / n_t   [d_out, d_in],

with ``n_t = ‖τ_t‖²_F``; and ``L = ⟨τ_m, τ_m A − 2C⟩ + Σ_t ⟨τ_t, τ_t τ_tᵀ τ_t⟩ / n_t`` comes for free from the
same product. A and C are built once (``4·T·d_out·d_in·min(d_out, d_in)`` flops); a step costs one GEMM,
``2·d_out·d_in²`` flops. When ``2·T·d_out < d_in`` the factored form ``τ_m A = (τ_m Yᵀ) Y`` with
``Y = [τ_1/√n_1; …; τ_T/√n_T]`` (``4·T·d_out²·d_in`` flops) is cheaper and is used instead.
Tasks with ``τ_t = 0`` contribute nothing (their term is 0/0 in the formula; the reference would produce NaN).
The update is torch's Adam (betas 0.9/0.999, eps 1e-8), exactly as in the reference code.
``tf32=true`` lets CUDA GEMMs use TF32 (≈8× faster on H100, ~1e-3 relative error per product).
Other tensors: ``W_pre + mean τ``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .base import AnchorMethod, ModuleInput, check_range, opt


class WudiObjective:
    """The WUDI loss of one module with its gradient in closed form (precomputed A and C)."""

    def __init__(self, taus: torch.Tensor, route: str = "auto"):
        T, d_out, d_in = taus.shape
        n = taus.reshape(T, -1).pow(2).sum(dim=1)
        active = [t for t in range(T) if float(n[t]) > 0.0]
        if route == "auto":
            route = "factored" if 2 * len(active) * d_out < d_in else "gram"
        if route not in ("gram", "factored"):
            raise ValueError(f"route {route!r}")
        self.route = route
        self.c = taus.new_zeros(d_out, d_in)
        self.const = taus.new_zeros(())
        self.a: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        if route == "gram":
            self.a = taus.new_zeros(d_in, d_in)
        ys = []
        for t in active:
            tau, w = taus[t], 1.0 / n[t]
            if route == "gram" or d_in <= d_out:
                m = tau.T @ tau  # [d_in, d_in]
                ct = (tau @ m) * w
                if self.a is not None:
                    self.a += m * w
            else:
                ct = ((tau @ tau.T) @ tau) * w  # d_out < d_in: the [d_out, d_out] product is cheaper
            self.c += ct
            self.const += (tau * ct).sum()
            if route == "factored":
                ys.append(tau * w.sqrt())
        if route == "factored":
            self.y = torch.cat(ys, dim=0) if ys else taus.new_zeros(0, d_in)

    def apply_a(self, tau_m: torch.Tensor) -> torch.Tensor:
        """``τ_m A``."""
        if self.a is not None:
            return tau_m @ self.a
        assert self.y is not None
        return (tau_m @ self.y.T) @ self.y

    def grad_and_loss(self, tau_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.apply_a(tau_m) - self.c  # half the gradient
        loss = (tau_m * (g - self.c)).sum() + self.const
        return 2.0 * g, loss


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def adam_step(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float,
              beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
    """One in-place Adam step, the same operations as ``torch.optim.Adam``'s single-tensor path (no weight decay)."""
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bias1 = 1.0 - beta1**step
    bias2_sqrt = math.sqrt(1.0 - beta2**step)
    p.addcdiv_(m, (v.sqrt() / bias2_sqrt).add_(eps), value=-lr / bias1)


def wudi_merge(
    taus: torch.Tensor, lr: float = 1e-5, steps: int = 300, *, route: str = "auto", tf32: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run WUDI on ``taus [T, d_out, d_in]`` where it lives; returns ``(τ_m, losses)``, ``losses[i]`` the loss before
    step i and ``losses[steps]`` the final one (kept on the device: no host sync per step)."""
    with _tf32(tf32), torch.no_grad():
        obj = WudiObjective(taus, route)
        tau_m = taus.sum(dim=0)
        m = torch.zeros_like(tau_m)
        v = torch.zeros_like(tau_m)
        losses = taus.new_empty(steps + 1)
        for i in range(steps):
            g, losses[i] = obj.grad_and_loss(tau_m)
            adam_step(tau_m, g, m, v, i + 1, lr)
        losses[steps] = obj.grad_and_loss(tau_m)[1]
    return tau_m, losses


@dataclass
class WudiOptions:
    lr: float = opt(1e-5, "Adam learning rate")
    steps: int = opt(300, "Adam steps")
    tf32: bool = opt(False, "allow TF32 GEMMs on CUDA (faster, ~1e-3 relative error per product)")


class Wudi(AnchorMethod):
    name = "wudi"
    summary = "WUDI: minimize sum_t ||(tau_m - tau_t) tau_t^T||^2 / ||tau_t||^2 by Adam from the task-vector sum"
    Options = WudiOptions

    def validate_options(self, opts: WudiOptions) -> None:
        check_range(self.name, "lr", opts.lr, 0.0, float("inf"), True, True)
        check_range(self.name, "steps", opts.steps, 0, 1_000_000, False, False)

    def _module(self, inp: ModuleInput, opts: WudiOptions, state: Any, device: torch.device) -> torch.Tensor:
        return wudi_merge(inp.taus, opts.lr, opts.steps, tf32=opts.tf32)[0]
