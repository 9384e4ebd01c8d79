r"""Output parameterization (``prediction_type``) and input preconditioning, from the HSM kernel alone.

Notation (per pixel, forward time t; k components, C data channels): the HSM kernel (PSLD Eq. 10) gives
``z_t = a_t x₀ + L_t ε`` with ``a_t`` = ``mean_coef`` (k), ``L_t`` = ``chol`` (k×k lower), ε ~ N(0, I_k).

**Why the paper's 2C ε output is inconsistent.** The *whitened observation* ``y = L⁻¹z = w x₀ + ε`` with
``w = L⁻¹a`` is a k-vector that sees the scalar x₀ along one direction ``u = w/‖w‖``. The *sufficient
statistic* for x₀ is ``uᵀy = ‖w‖ x₀ + uᵀε``: a scalar, VP-like channel with signal ``‖w‖`` and unit noise
(its SNR is ``‖w‖² = aᵀΣ⁻¹a``, the Fisher information of x₀ in z_t). The rest of ε is a *known*
function of the network's input, ``(I - uuᵀ)ε = (I - uuᵀ)L⁻¹z``. So every ε that a data point can
explain (a "consistent" ε) is

    ε = (I - uuᵀ) L⁻¹ z + u · (uᵀε),                                            (1)

and only the scalar ``uᵀε`` has to be learned. A 2C ε network spends capacity on the known part and
whatever it gets wrong there is exactly what the probability-flow ODE follows (README, ``project_eps``).

**Output types** (``prediction_type``, the network output ``f``; every map is affine in ``f`` and ``z``):

* ``"epsilon"`` — the paper's: ``f`` = ε, ``k*C`` channels; ε = f.
* ``"sample"`` — diffusers' name: ``f`` = x̂₀, ``C`` channels; ε = L⁻¹(z - a x̂₀) = L⁻¹z - w x̂₀.
* ``"sufficient_epsilon"`` — ``f`` = the noise of the sufficient statistic, ``uᵀε`` (the informative ε
  component; what a VP ε-network predicts for the channel ``uᵀy``), ``C`` channels; ε from Eq. (1).

For VP (k = 1) ``u = 1``: ``"sufficient_epsilon"`` *is* ``"epsilon"`` and ``"sample"`` is diffusers'
``"sample"``. For CLD (Γ = 0) the reverse dynamics use only ε_m (``RecipeSDE.eps_mask``), and by Eq. (1)
ε_m = known + u_m (uᵀε): the paper's CLD ε_m-loss is the ``uᵀε`` loss weighted by ``u_m(t)²`` (0.44 at
t = 1, 0.98 at t = 1e-4). :func:`loss_weight` turns the mask into exactly that weight, so one formula covers VP, CLD, PSLD.

**Inverse maps** ε → f go through the package's one x̂₀ estimator ``x̂₀ = aᵀ(z - Lε)/aᵀa`` (the schedulers'
``pred_original_sample``): ``"sample"`` returns it, ``"sufficient_epsilon"`` returns ``uᵀL⁻¹z - ‖w‖x̂₀``.
For a consistent ε the round trip f → ε → f is exact; for any ε, ε → f → ε equals the ``project_eps``
projection (:func:`diffusers_psld.sampling.eps_projection`).

**Input preconditioning** (EDM's c_in, generalised to k components): the network receives
``c_in(t) z_t`` with ``c_in(t) = (Σ_t + σ_data² a_t a_tᵀ)^{-1/2}`` (symmetric inverse square root, k×k),
the whitening of z_t for data of per-pixel variance σ_data².

**The sufficient statistic as a VP observation** (the bridge to denoisers D(y; σ), :mod:`diffusers_psld.denoisers`):
``y_t = σ_t² aᵀΣ_t⁻¹ z_t = σ_t ‖w‖⁻¹ uᵀL⁻¹z_t`` with ``σ_t² = 1/(aᵀΣ_t⁻¹a) = 1/‖w‖²`` is ``x₀ + σ_t n``, n ~ N(0, I),
and the likelihood p(z_t | x₀) depends on z_t only through y_t, so ``E[x₀ | z_t] = D(y_t; σ_t)``, the denoiser of the
data at noise level σ_t (what a VP ε-network at σ_VP = σ_t, or an EDM network, computes).
:func:`sufficient_statistic` gives the per-pixel coefficients of y and σ. The residual ``r = z - a y`` is
independent of x₀ and of y, with law N(0, Σ - σ²aaᵀ) = N(0, L(I - uuᵀ)Lᵀ) (rank k - 1): :func:`residual_factor`.
Back to the state's ε: ``ε = L⁻¹(z - a x̂₀)`` (the ``"sample"`` map); from any ε to x̂₀: :func:`denoised_estimator`.

All functions take float64 ``mean_coef`` ``[..., k]``, ``chol``/``cov`` ``[..., k, k]`` (e.g. batched over
times) and return float64 tables; :func:`apply` applies them to channel-stacked tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

__all__ = ["PREDICTION_TYPES", "OutputMaps", "output_components", "output_maps", "sufficient_direction",
           "loss_weight", "snr", "input_scaling", "apply", "check_prediction_type", "check_unet_channels",
           "maps_for_times", "scaling_for_times", "sufficient_statistic", "residual_factor", "denoised_estimator"]

PREDICTION_TYPES = ("epsilon", "sample", "sufficient_epsilon")


def check_prediction_type(prediction_type) -> str:
    """Return ``prediction_type`` or raise ``ValueError`` naming the allowed values."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return prediction_type


def output_components(prediction_type: str, k: int) -> int:
    """Components of the network output: ``k`` for ``"epsilon"`` (``k*C`` channels), 1 for the others (``C``)."""
    return k if check_prediction_type(prediction_type) == "epsilon" else 1


def check_unet_channels(in_channels: int, out_channels: int, k: int, prediction_type: str, what: str = "unet") -> int:
    """Validate a network's channel counts against a scheduler config; return the data channels C.

    Raises:
        ValueError: ``in_channels`` is not ``k*C``, or ``out_channels`` is not ``k*C`` (``"epsilon"``) /
            ``C`` (``"sample"``, ``"sufficient_epsilon"``), with the expected numbers and the fix.
    """
    j = output_components(prediction_type, k)
    if not isinstance(in_channels, int) or in_channels <= 0 or in_channels % k:
        raise ValueError(f"`{what}` must take the whole state, k*C channels with k={k}; got in_channels={in_channels!r}")
    c = in_channels // k
    if out_channels != j * c:
        hint = ("a C-channel network needs prediction_type='sample' or 'sufficient_epsilon' in the scheduler config"
                if out_channels == c and j != 1 else
                "a k*C-channel network needs prediction_type='epsilon' in the scheduler config"
                if out_channels == k * c and j != k else "rebuild it with out_channels = scheduler.output_channels(C)")
        raise ValueError(f"`{what}` has out_channels={out_channels} but the scheduler's prediction_type={prediction_type!r} "
                         f"needs {j * c} (= {j}*C, C={c}, k={k}); {hint}")
    return c


def sufficient_direction(mean_coef: torch.Tensor, chol: torch.Tensor):
    """``(w, ‖w‖, u)``: ``w = L⁻¹a`` ``[..., k]``, its norm ``[...]`` (√SNR) and ``u = w/‖w‖``."""
    a = torch.as_tensor(mean_coef, dtype=torch.float64)
    L = torch.as_tensor(chol, dtype=torch.float64)
    w = torch.linalg.solve_triangular(L, a[..., None], upper=False)[..., 0]
    norm = w.norm(dim=-1)
    return w, norm, w / norm[..., None]


def sufficient_statistic(mean_coef: torch.Tensor, chol: torch.Tensor):
    r"""The reduction of the state to a VP observation: ``(c, σ)`` with ``y = cᵀ z`` per pixel (``c`` ``[..., k]``)
    and ``y = x₀ + σ n`` (``σ`` ``[...]``, n ~ N(0, I)).

    ``c = σ² Σ⁻¹ a = L⁻ᵀ w / ‖w‖²`` and ``σ = 1/‖w‖ = (aᵀΣ⁻¹a)^{-1/2}`` (so ``cᵀa = 1``): y is the best
    unbiased linear estimate of x₀ from z_t and a sufficient statistic for x₀ (module docstring). VP (k = 1):
    ``y = z/√ᾱ``, ``σ = √(1 - ᾱ)/√ᾱ``, the variance-exploding form of the state.
    """
    L = torch.as_tensor(chol, dtype=torch.float64)
    w, norm, _ = sufficient_direction(mean_coef, L)
    c = torch.linalg.solve_triangular(L.transpose(-1, -2), w[..., None], upper=True)[..., 0] / (norm ** 2)[..., None]
    return c, 1.0 / norm


def residual_factor(mean_coef: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    r"""``M = L(I - uuᵀ)`` ``[..., k, k]`` with ``M Mᵀ = Σ - σ²aaᵀ``: the residual ``r = z - a y`` of the state given
    its sufficient statistic y has the law ``M ξ``, ξ ~ N(0, I_k) per pixel, independent of x₀ and of y. So
    ``z = a y + M ξ`` draws a state with the exact conditional law p(z_t | y_t) (rank k - 1; zero for VP)."""
    L = torch.as_tensor(chol, dtype=torch.float64)
    _, _, u = sufficient_direction(mean_coef, L)
    eye = torch.eye(L.shape[-1], dtype=torch.float64)
    return L @ (eye - u[..., :, None] * u[..., None, :])


def denoised_estimator(mean_coef: torch.Tensor, chol: torch.Tensor, eps_mask=None):
    r"""``(x0_z, x0_e)`` ``[..., k]`` each: the x̂₀ read from an ε, ``x̂₀ = Σ_i (x0_z)_i z_i + (x0_e)_i ε_i`` per pixel.

    ``eps_mask`` None or all True (VP, PSLD): the schedulers' ``pred_original_sample``, ``x̂₀ = aᵀ(z - Lε)/aᵀa``.
    Otherwise (CLD, Γ = 0: only ε_m is trained, :meth:`RecipeSDE.eps_mask`) the score's masked components
    alone, by Tweedie ``-L⁻ᵀε = -Σ⁻¹(z - a x̂₀)``: least squares over ``i ∈ mask`` of
    ``(Σ⁻¹z)_i - (L⁻ᵀε)_i = (Σ⁻¹a)_i x̂₀``. ``L⁻ᵀ`` is upper triangular, so for CLD the estimate uses ε_m only.
    Both are exact for the exact ε (and for any consistent ε, e.g. from the C-channel ``prediction_type`` s).
    """
    a = torch.as_tensor(mean_coef, dtype=torch.float64)
    L = torch.as_tensor(chol, dtype=torch.float64)
    k = a.shape[-1]
    mask = None if eps_mask is None else torch.as_tensor(eps_mask, dtype=torch.bool).reshape(k)
    if mask is None or bool(mask.all()):
        c = a / (a * a).sum(-1, keepdim=True)
        return c, -(c[..., None, :] @ L)[..., 0, :]
    eye = torch.eye(k, dtype=torch.float64).expand(L.shape)
    l_inv = torch.linalg.solve_triangular(L, eye, upper=False)
    prec = l_inv.transpose(-1, -2) @ l_inv  # Σ⁻¹
    g = (prec @ a[..., None])[..., 0] * mask.to(torch.float64)  # (Σ⁻¹a)_i on the mask, 0 elsewhere
    g = g / (g * g).sum(-1, keepdim=True)
    return (g[..., None, :] @ prec)[..., 0, :], -(g[..., None, :] @ l_inv.transpose(-1, -2))[..., 0, :]


def snr(mean_coef: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """``SNR_t = ‖L⁻¹a‖² = aᵀΣ⁻¹a`` ``[...]``: the SNR of the sufficient statistic (VP: α²/σ², diffusers'
    ``compute_snr``)."""
    return sufficient_direction(mean_coef, chol)[1] ** 2


@dataclass
class OutputMaps:
    """Affine maps between the network output f (j components) and ε (k components), per time.

    ``ε = eps_z z + eps_f f`` and ``f = out_z z + out_e ε``; shapes ``eps_z`` ``[..., k, k]``, ``eps_f``
    ``[..., k, j]``, ``out_z``/``out_e`` ``[..., j, k]`` (float64).
    """

    prediction_type: str
    eps_z: torch.Tensor
    eps_f: torch.Tensor
    out_z: torch.Tensor
    out_e: torch.Tensor

    def to(self, device=None, dtype=None) -> "OutputMaps":
        return OutputMaps(self.prediction_type, *(getattr(self, n).to(device=device, dtype=dtype)
                                                  for n in ("eps_z", "eps_f", "out_z", "out_e")))

    def __getitem__(self, i) -> "OutputMaps":
        return OutputMaps(self.prediction_type, self.eps_z[i], self.eps_f[i], self.out_z[i], self.out_e[i])

    def to_eps(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """ε ``[B, k*C, ...]`` from the network output ``[B, j*C, ...]`` and the state ``[B, k*C, ...]``."""
        if self.prediction_type == "epsilon":
            return model_output
        return apply(self.eps_z, sample) + apply(self.eps_f, model_output)

    def from_eps(self, eps: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The network output ``[B, j*C, ...]`` that corresponds to ``eps`` (its consistent projection)."""
        if self.prediction_type == "epsilon":
            return eps
        return apply(self.out_z, sample) + apply(self.out_e, eps)


def output_maps(prediction_type: str, mean_coef: torch.Tensor, chol: torch.Tensor) -> OutputMaps:
    """The float64 :class:`OutputMaps` of ``prediction_type`` for HSM kernels ``(a, L)`` (see the module docstring)."""
    check_prediction_type(prediction_type)
    a = torch.as_tensor(mean_coef, dtype=torch.float64)
    L = torch.as_tensor(chol, dtype=torch.float64)
    k = a.shape[-1]
    eye = torch.eye(k, dtype=torch.float64).expand(L.shape)
    if prediction_type == "epsilon":
        zero = torch.zeros_like(L)
        return OutputMaps(prediction_type, zero, eye.clone(), zero.clone(), eye.clone())
    w, norm, u = sufficient_direction(a, L)
    l_inv = torch.linalg.solve_triangular(L, eye, upper=False)  # L⁻¹
    c = a / (a * a).sum(-1, keepdim=True)  # x̂₀ = cᵀ(z - Lε)
    x0_z, x0_e = c[..., None, :], -(c[..., None, :] @ L)  # [..., 1, k]
    if prediction_type == "sample":  # ε = L⁻¹z - w x̂₀
        return OutputMaps(prediction_type, l_inv, -w[..., :, None], x0_z, x0_e)
    # "sufficient_epsilon": ε = (I - uuᵀ)L⁻¹z + u f;  f = uᵀL⁻¹z - ‖w‖ x̂₀
    uut = u[..., :, None] * u[..., None, :]
    ut_linv = u[..., None, :] @ l_inv
    n = norm[..., None, None]
    return OutputMaps(prediction_type, (eye - uut) @ l_inv, u[..., :, None], ut_linv - n * x0_z, -n * x0_e)


def loss_weight(maps: OutputMaps, eps_mask: torch.Tensor) -> torch.Tensor:
    r"""Per-time weight λ(t) ``[...]`` of the squared error of a C-channel output (``"sample"``,
    ``"sufficient_epsilon"``) such that ``λ(t)·mean_C (f - f*)²`` equals the paper's ε-loss (the mean over
    the ``eps_mask`` components) of the lifted output ``ε = eps_z z + eps_f f`` exactly:

        ``λ(t) = Σ_{i ∈ mask} (eps_f)_i² / |mask|``.

    ``"sufficient_epsilon"``: ``‖mask⊙u‖²/|mask|`` (1/2 for PSLD, 1 for VP, ``u_m(t)²`` for CLD);
    ``"sample"``: ``‖mask⊙w‖²/|mask|``, the SNR weight that makes x̂₀ regression ε-equivalent.
    """
    m = torch.as_tensor(eps_mask, dtype=torch.bool)
    ef = maps.eps_f[..., 0]
    return (ef[..., m] ** 2).sum(-1) / int(m.sum())


def input_scaling(mean_coef: torch.Tensor, cov: torch.Tensor, sigma_data: float) -> torch.Tensor:
    r"""``c_in(t) = (Σ_t + σ_data² a_t a_tᵀ)^{-1/2}`` ``[..., k, k]`` (symmetric, float64, by eigendecomposition).

    For data with per-pixel variance σ_data² (independent of ε), ``Cov(c_in z_t) = I_k``.

    Raises:
        ValueError: ``sigma_data`` is not a finite number > 0.
    """
    if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) or not (0 < float(sigma_data) < float("inf")):
        raise ValueError(f"`sigma_data` must be a finite number > 0 (the per-pixel std of the data), got {sigma_data!r}")
    a = torch.as_tensor(mean_coef, dtype=torch.float64)
    S = torch.as_tensor(cov, dtype=torch.float64) + float(sigma_data) ** 2 * a[..., :, None] * a[..., None, :]
    evals, evecs = torch.linalg.eigh(0.5 * (S + S.transpose(-1, -2)))
    return (evecs * evals.rsqrt()[..., None, :]) @ evecs.transpose(-1, -2)


def apply(mat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``(M ⊗ I) z`` for ``M`` ``[i, j]`` or ``[B, i, j]`` and ``z`` ``[B, j*C, ...]`` → ``[B, i*C, ...]``.

    The rectangular counterpart of :func:`diffusers_psld.sde.blocks.apply` (same component-major layout);
    the matrix is cast to ``z``'s dtype and device.
    """
    i, j = mat.shape[-2:]
    if z.ndim < 2 or z.shape[1] % j:
        raise ValueError(f"expected a tensor [B, {j}*C, ...] ({j} stacked components), got {tuple(z.shape)}")
    b, c = z.shape[0], z.shape[1] // j
    m = mat.to(device=z.device, dtype=z.dtype)
    zz = z.reshape(b, j, -1)
    out = torch.einsum("ij,bjn->bin", m, zz) if m.ndim == 2 else torch.einsum("bij,bjn->bin", m, zz)
    return out.reshape(b, i * c, *z.shape[2:])


def maps_for_times(sde, prediction_type: str, t) -> OutputMaps:
    """:func:`output_maps` at forward time(s) ``t`` of a :class:`~diffusers_psld.RecipeSDE`."""
    kern = sde.hsm_kernel(t)
    return output_maps(prediction_type, kern.mean_coef, kern.chol)


def scaling_for_times(sde, t, sigma_data: float) -> torch.Tensor:
    """:func:`input_scaling` at forward time(s) ``t`` of a :class:`~diffusers_psld.RecipeSDE`."""
    kern = sde.hsm_kernel(t)
    return input_scaling(kern.mean_coef, kern.cov, sigma_data)
