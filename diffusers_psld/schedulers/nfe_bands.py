r"""The measured defaults of :class:`~diffusers_psld.GDDIMMultistepScheduler`, per NFE band.

Where a multistep sampler should spend its evaluations depends on how many it has. Below ~10 network evaluations
(NFE) the start and end of the schedule decide most of the error on a trained network; with many evaluations the
schedule matters little and a grid that reaches ``sampling_eps`` converges to the exact probability-flow solution.
So the scheduler's defaults (``schedule_preset="auto"``) are a small table: for each NFE band and each state kind
(VP: one component; phase space: PSLD / CLD, two), the time grid, its end points σ_max / σ_min, and the solver
options. diffusers' DPM-Solver does the same for ``lower_order_final`` (on only below 15 steps).

For phase space the table has three rows: up to 7 NFE an EDM ρ = 7 σ-grid from σ 10 to 0.16, 8–12 NFE the same
from σ 80, and from 13 NFE the classic power-2.5 grid in t from t = 1 to ``sampling_eps`` with the UniC corrector and
``lower_order_final=True`` (the analytic first step of that row acts only with a ``sigma_max`` or a custom list, whose
grid starts below t = 1).
The EDM grid's early stop at σ 0.16 wins with few evaluations and loses with many (it keeps the bias of the last
denoising call at σ 0.16, which no NFE removes). Measured with PSLD gDDIM on trained digits networks (offline FID,
N = 2000; 5 sampling seeds at NFE 20, one at 50): through the bridge on a VP network, 1.13 ± 0.19 with the classic
grid and the corrector vs 1.70 ± 0.18 with the EDM band at NFE 20 (paired p < 0.001), 1.16 vs 1.57 at NFE 50; on a
PSLD network 1.70 ± 0.30 vs 1.97 ± 0.26 at NFE 20 (p = 0.28), 1.26 vs 2.22 at NFE 50. At NFE 10 the order flips
(classic grid + corrector 4.50 and 3.57 vs the EDM band 1.39 and 1.92); at 12 they are close (1.82 / 2.05 vs
1.49 / 2.18), so the EDM band ends at 12 NFE.

How the table was chosen: trained digits networks (a VP network, and PSLD networks of every output type through
the exact sufficient-statistic bridge and natively), N = 2000 samples, offline FID, selection on sampling seed 0,
confirmed on five other seeds, and on exact Gaussian-mixture / KDE scores (``benchmarks/low_nfe_sweep.py``,
``benchmarks/sampler_study.py``; the figures are in the documentation's *Samplers* page).

The band's σ_min is never below σ(``sampling_eps``) (``sampling_eps`` stays the smallest time of a schedule), and
its σ_max is capped at the recipe's σ(1). Where the σ_min so raised reaches half the σ_max so capped (a large
``sampling_eps``, or a recipe with little noise) the band grid is not used and the classic grid from t = 1 to
``sampling_eps`` is.

An explicitly set config key always wins over the table: ``time_grid`` / ``sigma_min`` / ``sigma_max`` / ``time_spacing`` /
``spacing_power`` (then the named grid comes from the config alone: setting only ``sigma_min``, for example, gives
the legacy power-2.5 grid from t = 1 down to it), ``corrector``, ``analytic_first_step``, ``lower_order_final``; a
``timesteps=`` / ``sigmas=`` schedule takes its grid from the list and the solver options from the table.
``schedule_preset="classic"`` resolves every unset key to the earlier fixed defaults (a power-2.5 grid from t = 1
to ``sampling_eps``, no corrector, no analytic first step, lower-order final steps below 15 steps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ["SCHEDULE_PRESETS", "NFEBand", "NFE_BANDS", "CLASSIC", "band_for"]

#: the values of ``schedule_preset``: the NFE bands, or the earlier fixed defaults
SCHEDULE_PRESETS = ("auto", "classic")


@dataclass(frozen=True)
class NFEBand:
    """One row of the table: the settings for ``max_nfe`` or fewer network evaluations.

    Attributes:
        max_nfe: the band's largest NFE (``None``: no upper bound).
        time_grid, rho: the named grid (``time_grids.TIME_GRIDS``) and its exponent; ``None`` grid: the classic one
            (``time_spacing`` / ``spacing_power``) from t = 1 to ``sampling_eps``.
        sigma_max, sigma_min: the first and last grid noise levels σ_t (clipped to the recipe's range); ``None``:
            t = 1 and ``sampling_eps``.
        corrector, analytic_first_step, lower_order_final: as the scheduler's config keys.
    """

    max_nfe: Optional[int]
    time_grid: Optional[str]
    rho: Optional[float]
    sigma_max: Optional[float]
    sigma_min: Optional[float]
    corrector: str
    analytic_first_step: bool
    lower_order_final: bool


#: the fixed defaults before the table (``schedule_preset="classic"``)
CLASSIC = NFEBand(None, None, None, None, None, "none", False, True)

#: The bands of each state kind in increasing ``max_nfe``, the last one unbounded: ``"vp"`` for one component,
#: ``"phase"`` for PSLD / CLD.
NFE_BANDS: dict = {
    "vp": (
        NFEBand(None, "edm", 7.0, 10.0, 0.16, "unic", True, True),
    ),
    "phase": (
        NFEBand(7, "edm", 7.0, 10.0, 0.16, "unic", True, False),
        NFEBand(12, "edm", 7.0, 80.0, 0.16, "unic", True, False),
        NFEBand(None, None, None, None, None, "unic", True, True),
    ),
}


def band_for(num_components: int, nfe: int, preset: str = "auto") -> Tuple[str, NFEBand]:
    """``(kind, band)``: the row of :data:`NFE_BANDS` for a recipe with ``num_components`` components (1: VP) at
    ``nfe`` network evaluations, or ``("classic", CLASSIC)`` for ``preset="classic"``.

    Raises ``ValueError`` for a preset outside :data:`SCHEDULE_PRESETS`."""
    if preset not in SCHEDULE_PRESETS:
        raise ValueError(f"`schedule_preset` must be one of {SCHEDULE_PRESETS}, got {preset!r}")
    if preset == "classic":
        return "classic", CLASSIC
    kind = "vp" if num_components == 1 else "phase"
    for band in NFE_BANDS[kind]:
        if band.max_nfe is None or nfe <= band.max_nfe:
            return kind, band
    raise AssertionError("the last band of every kind is unbounded")
