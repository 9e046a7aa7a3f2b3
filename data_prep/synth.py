"""Physics-based synthetic electron showers in the CaloChallenge DS2/DS3 format (GFlash parametrisation).

The real datasets cannot be downloaded everywhere, so this is the embedded default for the quickstart, the tests
and the benchmarks. The model is the GFlash parametrisation of electromagnetic showers for *sampling*
calorimeters: G. Grindhammer and S. Peters, "The parameterized simulation of electromagnetic showers in
homogeneous and sampling calorimeters", hep-ex/0001020 (referred to below as [GP]); parameter values as in
Geant4's GFlash (``GVFlashHomoShowerTuning.hh``, ``GFlashSamplingShowerTuning.hh``,
``GFlashSamplingShowerParameterisation.cc``; referred to as [G4]).

Per shower:

1. E_inc log-uniform in [1 GeV, 1 TeV].
2. Longitudinal profile: a Gamma distribution in depth t (radiation lengths) whose shower maximum T and shape
   alpha fluctuate per shower: (ln T, ln alpha) is a correlated 2-D Gaussian with means, widths and correlation
   that depend on y = E/E_c [GP eqs. for the homogeneous and sampling cases]. The energy per readout layer is
   the Gamma CDF difference over the layer (``scipy.special.gammainc``); what falls behind layer 45 leaks.
3. Energy spots: N_spot = 10.3 / c_s * E^0.959 (E in GeV) spots per shower [GP, sampling calorimeters], spread
   over the layers with their own (slightly shifted) Gamma profile, Poisson per layer.
4. Radial profile: each spot's radius is drawn from the two-component (core + tail) profile
   f(r) = p 2r R_C^2/(r^2+R_C^2)^2 + (1-p) 2r R_T^2/(r^2+R_T^2)^2, with R_C, R_T (Moliere radii) and p depending on
   the depth tau and the energy [GP], including the sampling-calorimeter corrections [G4]. Azimuth uniform; the
   electron enters at r = 0 along z as in Geant4 example Par04 (no transverse offset, none in the real data).
   Spots beyond the last radial edge (41.85 mm) are lost, as in the real data.
5. Sampling fluctuations: the visible energy of a voxel with mean mu is Gamma(mu / theta, theta) with
   theta = c_s^2 * 1 GeV. A sum of such Gammas is again such a Gamma, so the layer and total energies get exactly
   the stochastic resolution sigma/E = c_s / sqrt(E/GeV) (the same Gamma law Geant4 GFlash applies per step,
   ``ApplySampling``), while voxels also fluctuate locally, as in a silicon readout.
6. Primary track (beyond GFlash): the charged primary always leaves two MIP signals on the axis of layer 0.
7. Voxels below the 15.15 keV readout threshold are set to zero.

Detector: Geant4 example Par04 as used for CaloChallenge DS2/DS3 -- per physical layer 1.4 mm W + 0.3 mm Si,
two physical layers per readout layer (3.4 mm). GFlash's effective-medium formulas ([G4]
``ComputeZAX0EFFetc``) give X0_eff = 4.22 mm (one readout layer = 0.81 X0_eff), R_M,eff = 9.5 mm,
E_c,eff = 9.4 MeV, Z_eff = 72.5, sampling frequency F_S = X0_eff / d = 2.48 and e/mip ratio e^ = 0.70 -- close to
the plain tungsten figures (X0 3.5 mm, R_M 9.3 mm, E_c 8 MeV) but consistent with the layer thickness.

Reproducibility: showers come in fixed sub-blocks of ``SUB_BLOCK`` showers; sub-block i draws everything from
``SeedSequence(seed).spawn(...)[i]``. The output therefore does not depend on ``block_size``, and the first k
showers of a run with n > k equal a run with n = k.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy.special import gammainc
from tqdm import tqdm

from hpc_calo.errors import UserError, run_cli
from hpc_calo.flags import non_negative_int, number
from hpc_calo.geometry import (
    DATASETS,
    E_INC_MAX_MEV,
    E_INC_MIN_MEV,
    R_MAX_MM,
    Geometry,
    apply_threshold,
    get_geometry,
)
from hpc_calo.io import CaloWriter
from hpc_calo.io.hdf5 import MAX_SHOWERS
from hpc_calo.seeding import DEFAULT_SEED

# Showers per independently seeded sub-block: small enough to keep the per-spot arrays of a 1 TeV sub-block in
# tens of MB, large enough that numpy's per-call overhead is amortised.
SUB_BLOCK = 64
GENERATOR_VERSION = "gflash-1"

# --- GFlash parameters. [G4] = GVFlashHomoShowerTuning.hh / GFlashSamplingShowerTuning.hh, [GP] = hep-ex/0001020.
# Homogeneous longitudinal means: <ln T_hom> = ln(ln y + t1), <ln alpha_hom> = ln(a1 + (a2 + a3/Z) ln y).
T1_HOM, A1_HOM, A2_HOM, A3_HOM = -0.812, 0.81, 0.458, 2.26
# Sampling shifts: T_sam = T_hom + t1/F_S + t2 (1 - e^); alpha_sam = alpha_hom + a1/F_S.
T1_SAM, T2_SAM, A1_SAM = -0.55, -0.69, -0.476
# Sampling widths and correlation: sigma(ln T) = 1/(s1 + s2 ln y), sigma(ln alpha) = 1/(s1 + s2 ln y),
# rho(ln T, ln alpha) = r1 + r2 ln y.
SIG_T_SAM = (-2.5, 1.25)
SIG_A_SAM = (-0.82, 0.79)
RHO_SAM = (0.784, -0.023)
# Radial core radius R_C = z1 + z2 tau, z1 = c1 + c2 ln E, z2 = c3 + c4 Z; sampling: + c1s (1-e^) + c2s/F_S e^-tau.
RC = (0.0251, 0.00319, 0.1162, -0.000381)
RC_SAM = (-0.0203, 0.0397)
# Radial tail radius R_T = k1 (exp(k3 (tau - k2)) + exp(k4 (tau - k2))), k1 = t1 + t2 Z, k4 = t5 + t6 ln E;
# sampling: + t1s (1-e^) + t2s/F_S e^-tau. t6 = 0.0421 as printed in [GP] ([G4] has 0.0412; the difference
# moves R_T by < 1% at 1 TeV).
RT = (0.659, -0.00309, 0.645, -2.59, 0.3585, 0.0421)
RT_SAM = (-0.14, -0.495)
# Core weight p = p1 exp((p2 - tau)/p3 - exp((p2 - tau)/p3)), p1 = c1 + c2 Z, p2 = c3 + c4 Z, p3 = c5 + c6 ln E;
# sampling: + (1-e^)(c1s + c2s/F_S exp(-(tau-1)^2)).
WC = (2.632, -0.00094, 0.401, 0.00187, 1.313, -0.0686)
WC_SAM = (0.348, -0.642)
# Spots (sampling): N_spot = n1 / c_s * E^n2; T_spot = T (t1 + t2 Z); alpha_spot = alpha (a1 + a2 Z).
# n1, n2 and the spot-profile factors are [G4] GFlashSamplingShowerTuning's ParsSpot* values; the 1/c_s scaling is
# [G4] GenerateNSpotProfile's. (That header's comment also writes an ln Z factor, which no code path applies, and
# [G4]'s sampling class actually calls the homogeneous 93 ln Z E^0.876 there; we use the sampling values as the
# tuning class names them. Not checked against the paper's text.)
SPOT_N = (10.3, 0.959)
SPOT_T = (0.813, 0.0019)
SPOT_A = (0.844, 0.0026)
E_S_MEV = 21.2  # multiple-scattering energy in the Moliere radius, [G4]


@dataclass(frozen=True)
class Detector:
    """The Par04 W/Si stack (CaloChallenge DS2/DS3) and its GFlash effective-medium quantities.

    Material constants from the PDG tables: W X0 3.504 mm, E_c 7.97 MeV, density 19.3 g/cm^3; Si X0 93.7 mm,
    E_c 40.19 MeV, density 2.33 g/cm^3.
    """

    d_abs_mm: float = 1.4
    d_act_mm: float = 0.3
    layers_per_readout: int = 2
    z_abs: float = 74.0
    z_act: float = 14.0
    x0_abs_mm: float = 3.504
    x0_act_mm: float = 93.7
    ec_abs_mev: float = 7.97
    ec_act_mev: float = 40.19
    rho_abs: float = 19.3
    rho_act: float = 2.33
    # Stochastic term c_s of sigma/E = c_s/sqrt(E/GeV). Not published for Par04; 0.12 scales the CALICE SiW ECAL
    # figure (16.6 %/sqrt(E) with 2.8 mm average W) by sqrt(1.4/2.8), the usual thickness scaling. Assumption.
    c_s: float = 0.12
    # The files are divided by the electron sampling fraction; a silicon signal of x MeV is stored as x / 0.033.
    sampling_fraction: float = 0.033
    # Minimum-ionising signal of one 300 um Si sensor: most probable 84 keV; Landau width
    # xi = (K/2)(Z/A) rho x = 0.1535 MeV cm^2/g * 0.498 * 0.0699 g/cm^2 = 5.35 keV (PDG, passage of particles).
    mip_mpv_mev: float = 0.084
    mip_xi_mev: float = 0.00535

    @property
    def mip_mean_mev(self) -> float:
        """Mean stored energy of the primary's two MIP signals in layer 0 (Moyal mean: loc + xi (gamma + ln 2))."""
        per_sensor = self.mip_mpv_mev + self.mip_xi_mev * (np.euler_gamma + math.log(2.0))
        return self.layers_per_readout * per_sensor / self.sampling_fraction

    @cached_property
    def _w(self) -> tuple[float, float]:
        m1, m2 = self.d_abs_mm * self.rho_abs, self.d_act_mm * self.rho_act
        return m1 / (m1 + m2), m2 / (m1 + m2)

    @cached_property
    def z_eff(self) -> float:
        w1, w2 = self._w
        return w1 * self.z_abs + w2 * self.z_act

    @cached_property
    def x0_mm(self) -> float:
        w1, w2 = self._w
        rho = (self.d_abs_mm * self.rho_abs + self.d_act_mm * self.rho_act) / (self.d_abs_mm + self.d_act_mm)
        return 1.0 / (w1 * rho / (self.x0_abs_mm * self.rho_abs) + w2 * rho / (self.x0_act_mm * self.rho_act))

    @cached_property
    def _ec_over_x0(self) -> float:
        w1, w2 = self._w
        return w1 * self.ec_abs_mev / self.x0_abs_mm + w2 * self.ec_act_mev / self.x0_act_mm

    @cached_property
    def rm_mm(self) -> float:
        return E_S_MEV / self._ec_over_x0

    @cached_property
    def ec_mev(self) -> float:
        return self.x0_mm * self._ec_over_x0

    @cached_property
    def fs(self) -> float:
        """GFlash sampling frequency F_S = X0_eff / (d_abs + d_act)."""
        return self.x0_mm / (self.d_abs_mm + self.d_act_mm)

    @cached_property
    def ehat(self) -> float:
        """GFlash e/mip ratio e^ = 1 / (1 + 0.007 (Z_abs - Z_act))."""
        return 1.0 / (1.0 + 0.007 * (self.z_abs - self.z_act))

    @property
    def readout_layer_mm(self) -> float:
        return self.layers_per_readout * (self.d_abs_mm + self.d_act_mm)

    @property
    def theta_mev(self) -> float:
        """Gamma scale of the sampling fluctuations: variance = theta * mean."""
        return self.c_s**2 * 1000.0


PAR04 = Detector()


@dataclass(frozen=True)
class Profiles:
    """Per-shower (n,) and per-(shower, layer) (n, L) quantities of one sub-block."""

    e_layer: np.ndarray  # (n, L) mean energy per layer before sampling fluctuations, MeV
    n_spots: np.ndarray  # (n, L) spots per layer
    r_core: np.ndarray  # (n, L) mm
    r_tail: np.ndarray  # (n, L) mm
    p_core: np.ndarray  # (n, L)
    mip: np.ndarray  # (n,) the primary electron's own signal in layer 0, MeV (already fluctuated)


def longitudinal_parameters(e_mev: np.ndarray, z: np.ndarray, det: Detector = PAR04) -> tuple[np.ndarray, ...]:
    """Per-shower (T, alpha) from standard normals z (n, 2), and the mean alpha (for tau). [GP] sampling case."""
    ln_y = np.log(e_mev / det.ec_mev)
    t_hom = ln_y + T1_HOM
    a_hom = A1_HOM + (A2_HOM + A3_HOM / det.z_eff) * ln_y
    mean_ln_t = np.log(np.maximum(t_hom + T1_SAM / det.fs + T2_SAM * (1 - det.ehat), 0.1))
    mean_ln_a = np.log(np.maximum(a_hom + A1_SAM / det.fs, 0.1))
    sig_t = np.minimum(0.5, 1.0 / (SIG_T_SAM[0] + SIG_T_SAM[1] * ln_y))
    sig_a = np.minimum(0.5, 1.0 / (SIG_A_SAM[0] + SIG_A_SAM[1] * ln_y))
    rho = RHO_SAM[0] + RHO_SAM[1] * ln_y
    # Correlated pair as in [G4] GenerateEnergyProfile: (c1 z1 + c2 z2, c1 z1 - c2 z2) has correlation rho.
    c1, c2 = np.sqrt((1 + rho) / 2), np.sqrt((1 - rho) / 2)
    t_max = np.maximum(1.0, np.exp(mean_ln_t + sig_t * (c1 * z[:, 0] + c2 * z[:, 1])))
    alpha = np.maximum(1.1, np.exp(mean_ln_a + sig_a * (c1 * z[:, 0] - c2 * z[:, 1])))
    return t_max, alpha, np.exp(mean_ln_a)


def _gamma_layer_fractions(alpha: np.ndarray, beta: np.ndarray, edges_x0: np.ndarray) -> np.ndarray:
    cdf = gammainc(alpha[:, None], beta[:, None] * edges_x0[None, :])
    return np.diff(cdf, axis=1)


def shower_profiles(e_mev: np.ndarray, rng: np.random.Generator, n_layers: int, det: Detector = PAR04) -> Profiles:
    n = len(e_mev)
    t_max, alpha, mean_alpha = longitudinal_parameters(e_mev, rng.standard_normal((n, 2)), det)
    beta = (alpha - 1.0) / t_max
    edges = np.arange(n_layers + 1) * (det.readout_layer_mm / det.x0_mm)  # layer edges in X0_eff
    # [GP]'s sampling (T, alpha) describe the profile of the *sampled* energy, which is what the files hold. ([G4]
    # integrates the homogeneous pair here and uses the sampling pair only for tau.)
    e_layer = e_mev[:, None] * _gamma_layer_fractions(alpha, beta, edges)
    # Primary track: the incident electron crosses layer 0's two sensors before it has radiated much, so it always
    # leaves two MIP signals on the axis -- something GFlash's smooth profile does not have (it leaves layer 0
    # empty in ~20 % of showers, while a charged primary never can). The signal is Landau-like (Moyal, which
    # numpy draws as -ln(Z^2) for standard normal Z) and replaces its mean from the GFlash layer-0 energy, so
    # the total is unchanged on average.
    moyal = -np.log(rng.standard_normal((n, det.layers_per_readout)) ** 2)
    mip = (det.mip_mpv_mev + det.mip_xi_mev * moyal).sum(axis=1) / det.sampling_fraction
    e_layer[:, 0] = np.maximum(e_layer[:, 0] - det.mip_mean_mev, 0.0)

    e_gev = e_mev / 1000.0
    z = det.z_eff
    t_spot = np.maximum(0.5, t_max * (SPOT_T[0] + SPOT_T[1] * z))
    a_spot = alpha * (SPOT_A[0] + SPOT_A[1] * z)
    spot_frac = _gamma_layer_fractions(a_spot, (a_spot - 1.0) / t_spot, edges)
    n_spot_total = SPOT_N[0] / det.c_s * e_gev ** SPOT_N[1]
    # At least one spot per layer so that no layer's energy is dropped.
    n_spots = np.maximum(rng.poisson(n_spot_total[:, None] * spot_frac), 1)

    # Depth in units of the shower's own centre of gravity, rescaled to T as in [G4] ComputeTau.
    t_mid = 0.5 * (edges[1:] + edges[:-1])
    tau = t_mid[None, :] / t_max[:, None] * ((alpha - 1) / alpha * mean_alpha / (mean_alpha - 1))[:, None]
    ln_e = np.log(e_gev)[:, None]
    one_m_ehat, exp_tau = 1.0 - det.ehat, np.exp(-tau)
    r_core = (RC[0] + RC[1] * ln_e) + (RC[2] + RC[3] * z) * tau
    r_core = r_core + RC_SAM[0] * one_m_ehat + RC_SAM[1] / det.fs * exp_tau
    k1, k2, k3, k4 = RT[0] + RT[1] * z, RT[2], RT[3], RT[4] + RT[5] * ln_e
    r_tail = k1 * (np.exp(k3 * (tau - k2)) + np.exp(k4 * (tau - k2)))
    r_tail = r_tail + RT_SAM[0] * one_m_ehat + RT_SAM[1] / det.fs * exp_tau
    p1, p2, p3 = WC[0] + WC[1] * z, WC[2] + WC[3] * z, WC[4] + WC[5] * ln_e
    arg = (p2 - tau) / p3
    p_core = p1 * np.exp(arg - np.exp(arg))
    p_core = p_core + one_m_ehat * (WC_SAM[0] + WC_SAM[1] / det.fs * np.exp(-((tau - 1.0) ** 2)))
    # The fitted forms can leave their domain far from the maximum: keep radii positive and p a probability.
    return Profiles(
        e_layer=e_layer,
        n_spots=n_spots,
        r_core=np.maximum(r_core, 0.02) * det.rm_mm,
        r_tail=np.maximum(r_tail, 0.05) * det.rm_mm,
        p_core=np.clip(p_core, 0.0, 1.0),
        mip=np.maximum(mip, 0.0),
    )


def _deposit(prof: Profiles, rng: np.random.Generator, geometry: Geometry, det: Detector = PAR04) -> np.ndarray:
    """Spots -> mean voxel energies -> sampling fluctuations -> threshold. Returns (n, n_voxels) float32."""
    n, n_layers = prof.e_layer.shape
    n_alpha, n_r = geometry.n_alpha, geometry.n_r
    counts = prof.n_spots.ravel()
    cell = np.repeat(np.arange(n * n_layers, dtype=np.int64), counts)  # (shower, layer) of each spot
    n_tot = cell.size
    # One uniform picks core or tail and, re-scaled inside the chosen interval, is a fresh uniform for the
    # radius: saves a third of the random draws, which dominate the cost at high energy.
    u = rng.random(n_tot)
    p = prof.p_core.ravel()[cell]
    core = u < p
    v = np.where(core, u / np.maximum(p, 1e-300), (u - p) / np.maximum(1.0 - p, 1e-300))
    v = np.minimum(v, 1.0 - 1e-12)
    radius = np.where(core, prof.r_core.ravel()[cell], prof.r_tail.ravel()[cell]) * np.sqrt(v / (1.0 - v))
    r_bin = np.minimum(radius * (n_r / R_MAX_MM), n_r).astype(np.int64)
    a_bin = rng.integers(0, n_alpha, n_tot)
    keep = r_bin < n_r  # spots beyond 41.85 mm leave the readout, as in the real data
    flat = (cell[keep] * n_alpha + a_bin[keep]) * n_r + r_bin[keep]
    hits = np.bincount(flat, minlength=n * n_layers * n_alpha * n_r).reshape(n, n_layers, n_alpha * n_r)
    spot_e = prof.e_layer / prof.n_spots
    mean = hits * spot_e[:, :, None]
    out = np.zeros(mean.shape, dtype=np.float64)
    nz = mean > 0
    theta = det.theta_mev
    out[nz] = rng.gamma(mean[nz] / theta, theta)
    # The primary's MIP signal lands in the innermost ring of layer 0, at a random angle: the electron enters at
    # r = 0, where the angular bin is set by its first multiple-scattering steps.
    out[np.arange(n), 0, rng.integers(0, n_alpha, n) * n_r] += prof.mip
    apply_threshold(out)
    return out.reshape(n, -1).astype(np.float32)


def _sub_block(geometry: Geometry, seed: int, index: int, det: Detector) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    log_lo, log_hi = math.log(E_INC_MIN_MEV), math.log(E_INC_MAX_MEV)
    e_inc = np.exp(rng.uniform(log_lo, log_hi, SUB_BLOCK))
    prof = shower_profiles(e_inc, rng, geometry.n_layers, det)
    return e_inc, _deposit(prof, rng, geometry, det)


def generate_blocks(
    geometry: Geometry, n: int, seed: int, block_size: int = 1024, detector: Detector = PAR04
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (e_inc (b,) float64 MeV, showers (b, n_voxels) float32 MeV) blocks, n showers in all.

    Independent of ``block_size``: sub-block i of ``SUB_BLOCK`` showers is drawn from
    ``SeedSequence(seed).spawn(i + 1)[i]`` (spawn_key (i,)), and blocks are cut from the concatenation.
    """
    if n <= 0:
        raise UserError(f"number of showers must be positive, got {n}")
    if block_size <= 0:
        raise UserError(f"block size must be positive, got {block_size}")
    pending_e: list[np.ndarray] = []
    pending_s: list[np.ndarray] = []
    have, done, index = 0, 0, 0
    while done < n:
        want = min(block_size, n - done)
        while have < want:
            e, s = _sub_block(geometry, seed, index, detector)
            pending_e.append(e)
            pending_s.append(s)
            have += len(e)
            index += 1
        e_all, s_all = np.concatenate(pending_e), np.concatenate(pending_s)
        yield e_all[:want], s_all[:want]
        pending_e, pending_s = [e_all[want:]], [s_all[want:]]
        have -= want
        done += want


def write_synthetic(
    path: str | os.PathLike[str],
    dataset: str,
    n: int,
    seed: int,
    compression: str = "gzip",
    *,
    block_size: int | None = None,
    progress: bool = False,
) -> Path:
    """Write n synthetic showers of ``dataset`` to a CaloChallenge HDF5 file (atomically) and return its path."""
    geometry = get_geometry(dataset)
    if n <= 0:
        raise UserError(f"number of showers must be positive, got {n}")
    path = Path(path)
    # ~64 MB of float32 showers per block: bounded memory for DS3, few HDF5 calls for DS2.
    block_size = block_size or max(SUB_BLOCK, (64 * 2**20 // (4 * geometry.n_voxels)) // SUB_BLOCK * SUB_BLOCK)
    attrs = {"generator": f"hpc_calo data_prep.synth {GENERATOR_VERSION}", "seed": seed, "dataset": geometry.name}
    # The bar starts only once the writer has checked the output path, so errors stay one line.
    with (
        CaloWriter(path, geometry, n_total=n, compression=compression, attrs=attrs) as writer,
        tqdm(total=n, unit="shower", desc=f"synth {geometry.name}", dynamic_ncols=True, disable=not progress) as bar,
    ):
        for e, s in generate_blocks(geometry, n, seed, block_size):
            writer.write(e, s)
            bar.update(len(e))
    return path


@dataclass(frozen=True)
class SynthRequest:
    """A synthetic CaloChallenge file of ``showers`` showers at ``out`` (same seed, same file)."""

    out: Path
    dataset: str
    showers: int
    seed: int = DEFAULT_SEED
    compression: str = "gzip"
    progress: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.showers <= MAX_SHOWERS:
            raise UserError(f"--showers must be between 1 and {MAX_SHOWERS:.0e}, got {self.showers}")
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")


def synthesize(req: SynthRequest) -> Path:
    """Write the file; an existing output is replaced only if it is a CaloChallenge file (CaloWriter's rule)."""
    return write_synthetic(req.out, req.dataset, req.showers, req.seed, req.compression, progress=req.progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.synth",
        description=(
            "Generate synthetic electron showers (GFlash parametrisation for the CaloChallenge W/Si detector) "
            "in the CaloChallenge 2022 HDF5 format, streamed to disk in blocks."
        ),
    )
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="voxel geometry: ds2 or ds3")
    parser.add_argument("--showers", required=True, type=number(int, "--showers", 1, MAX_SHOWERS),
                        help="number of showers to generate (> 0)")
    parser.add_argument("--out", required=True, type=Path, help="output HDF5 file (written atomically)")
    parser.add_argument("--seed", type=non_negative_int("--seed"), default=DEFAULT_SEED,
                        help=f"random seed; same seed, same file (default {DEFAULT_SEED})")
    parser.add_argument(
        "--compression", choices=["gzip", "none"], default="gzip", help="HDF5 compression (default gzip)"
    )
    parser.add_argument("--plot", type=Path, metavar="DIR", help="also write diagnostic PNGs into DIR")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    req = SynthRequest(args.out, args.dataset, args.showers, args.seed, args.compression)
    if args.plot is not None and args.plot.exists() and not args.plot.is_dir():
        raise UserError(f"{args.plot}: --plot needs a directory, this is a file")
    out = synthesize(req)
    print(f"wrote {args.showers} {args.dataset} showers to {out}")
    if args.plot:
        from data_prep.plots import plot_file

        for png in plot_file(out, args.plot, get_geometry(args.dataset)):
            print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    run_cli(main)
