"""Every invertible transform between raw energies (MeV) and the spaces the flows see, in one place.

The reference iCaloFlow code (Buckley, Krause, Pang, Shih) fixes the choices; each forward map here has its
inverse next to it so that training (forward) and generation (inverse) cannot drift apart.

==========================  =============================================  =========================================
transform                   forward                                        inverse
==========================  =============================================  =========================================
dequantisation noise        x + u,  u ~ U[0, w) fresh every call           none needed (noise is below threshold)
layer normalisation         I = layer / sum(layer)   (empty: uniform 1/V)  layer = I * E_layer
logit                       y = logit(a + (1 - 2a) x),  a = 1e-6           x = clip((sigmoid(y) - a)/(1 - 2a), 0, 1)
incident energy             c = log10(E_inc / MeV) - 4.5                   E_inc = 10^(c + 4.5) MeV
layer energy                c = logit(clip(E / 65 GeV, 0, 1))              E = 65 GeV * inverse logit(c)
flow-1 "fractions"          logit(E_tot / 2 E_inc), logit(E_i / sum_j>=i)  products of the fractions (see below)
flow-1 "shares"             logit(E_tot / 2 E_inc), log10(E_i / E_tot)    E_tot * 10^v_i / sum_j 10^v_j
layer index (flow-3)        one_hot(n - 1, 44)                             argmax + 1
==========================  =============================================  =========================================

The noise width w is the reference's 5 keV unless the preset or the training asks for another (``FlowModel.noise_mev``).
Flow-2 divides its layer-energy condition by 4, as the reference does. Noise is drawn from ``generator`` when
given, else from torch's global RNG, so that a training run that restores the RNG state resumes exactly.
"""

from __future__ import annotations

import torch

from hpc_calo.geometry import N_LAYERS, apply_threshold

NOISE_MEV = 5.0e-3  # dequantisation noise width: 5 keV, the reference's noise_level
E_NORM_MEV = 6.5e4  # layer energies are encoded relative to 65 GeV (just above the largest DS2/DS3 layer)
ALPHA = 1.0e-6  # logit regulator of the MAF paper
E_INC_SHIFT = 4.5  # log10(E_inc/MeV) spans [3, 6]; centred at 4.5
N_CLASSES = N_LAYERS - 1  # flow-3 conditions on the index of the previous layer, 0..43
FLOW2_E_SCALE = 4.0  # the reference divides flow-2's layer-energy condition by 4


def add_noise(x: torch.Tensor, generator: torch.Generator | None = None, width: float = NOISE_MEV) -> torch.Tensor:
    """Dequantise: add fresh U[0, width) noise (MeV). The inverse is the identity (the cut removes it)."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + width * u


def normalise(layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) energies -> (shape summing to 1, sum). An empty layer becomes the uniform shape 1/V."""
    total = layer.sum(dim=-1, keepdim=True)
    empty = total <= 0
    safe = torch.where(empty, torch.ones_like(total), total)
    shape = torch.where(empty, torch.full_like(layer, 1.0 / layer.shape[-1]), layer / safe)
    return shape, total.squeeze(-1)


def denormalise(shape: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalise`: scale each shape row by its layer energy (MeV)."""
    return shape * energy.unsqueeze(-1)


def logit(x: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """x in [0, 1] -> logit(alpha + (1 - 2 alpha) x); log - log1p keeps float32 accurate near 1."""
    p = alpha + (1.0 - 2.0 * alpha) * x
    return torch.log(p) - torch.log1p(-p)


def inverse_logit(y: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """Inverse of :func:`logit`, clipped to [0, 1] (flow samples may land outside the image)."""
    return ((torch.sigmoid(y) - alpha) / (1.0 - 2.0 * alpha)).clamp(0.0, 1.0)


def encode_e_inc(e_inc: torch.Tensor) -> torch.Tensor:
    return torch.log10(e_inc) - E_INC_SHIFT


def decode_e_inc(c: torch.Tensor) -> torch.Tensor:
    return torch.pow(10.0, c + E_INC_SHIFT)


def encode_layer_energy(e: torch.Tensor) -> torch.Tensor:
    """logit(E / 65 GeV). Clipped to [0, 1] first: a layer above 65 GeV (none in DS2/DS3) stays finite."""
    return logit((e / E_NORM_MEV).clamp(0.0, 1.0))


def decode_layer_energy(c: torch.Tensor) -> torch.Tensor:
    return inverse_logit(c) * E_NORM_MEV


# Flow-1's own view of the 45 layer energies. "absolute" is the reference's (each layer's logit(E / 65 GeV)): the
# shower's total, and so the energy response, is then a sum of 45 independently erred outputs. "fractions" is
# CaloFlow's: u_0 = E_tot / (2 E_inc), u_i = E_i / sum_{j >= i} E_j, all in logit space, so E_tot / E_inc is ONE
# feature the flow learns directly and every decoded shower's layers add up to it exactly. Its chain of products
# has a weakness in the sparse tail: the last lit layer must take all but the dequantisation noise of what is left,
# a fraction within ~1e-5 of 1, and any shortfall flows on into the empty layers behind it. "shares" keeps
# u_0 and gives each layer its own share of the total, log10(E_i / E_tot), so an empty layer is a mode at the
# noise level that no other layer's error can fill; the shares are renormalised on decoding (46 features).
ENERGY_ENCODINGS = ("absolute", "fractions", "shares")
E_TOT_SCALE = 2.0  # u_0 = E_tot / (2 E_inc): electromagnetic showers deposit at most ~1.1 E_inc after scaling


def flow1_features(encoding: str) -> int:
    """Number of flow-1 features for an encoding: one per layer, and "shares" adds the total."""
    return N_LAYERS + (encoding == "shares")


def encode_flow1(layer_e: torch.Tensor, e_inc: torch.Tensor, encoding: str) -> torch.Tensor:
    """(B, 45) layer energies (MeV, noise added by the caller), (B,) or (B, 1) E_inc -> flow-1 features (B, 45;
    "shares": 46)."""
    if encoding == "absolute":
        return encode_layer_energy(layer_e)
    total = layer_e.sum(dim=-1, keepdim=True)
    u_0 = logit((total / (E_TOT_SCALE * e_inc.reshape(-1, 1))).clamp(0.0, 1.0))
    if encoding == "shares":
        return torch.cat([u_0, torch.log10(layer_e.clamp_min(1e-30) / total.clamp_min(1e-30))], dim=-1)
    # Energy still to deposit from layer i on; clamp keeps an all-empty tail finite (its fractions are then 0).
    remaining = torch.flip(torch.cumsum(torch.flip(layer_e, [-1]), -1), [-1]).clamp_min(1e-30)
    return torch.cat([u_0, logit((layer_e[:, :-1] / remaining[:, :-1]).clamp(0.0, 1.0))], dim=-1)


def decode_flow1(c: torch.Tensor, e_inc: torch.Tensor, encoding: str) -> torch.Tensor:
    """Inverse of :func:`encode_flow1`: flow-1 samples (B, 45 or 46) -> layer energies (B, 45) MeV."""
    if encoding == "absolute":
        return decode_layer_energy(c)
    total = inverse_logit(c[:, :1]) * E_TOT_SCALE * e_inc.reshape(-1, 1)
    if encoding == "shares":
        # Shifting by the largest share before exponentiating keeps float32 finite for any flow output.
        v = c[:, 1:] - c[:, 1:].amax(dim=-1, keepdim=True)
        w = torch.pow(10.0, v)
        return total * w / w.sum(dim=-1, keepdim=True)
    f = inverse_logit(c[:, 1:])  # the share of what is left that each of layers 0..43 takes; layer 44 the rest
    ones = torch.ones_like(total)
    remaining = total * torch.cat([ones, torch.cumprod(1.0 - f, dim=-1)], dim=-1)
    return remaining * torch.cat([f, ones], dim=-1)


def one_hot_layer(n: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Layer index n in 1..44 (the layer being generated) -> one-hot of n - 1 over 44 classes."""
    return torch.nn.functional.one_hot(n.long() - 1, N_CLASSES).to(dtype)


def layer_index(onehot: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`one_hot_layer`."""
    return onehot.argmax(dim=-1) + 1


def encode_shape(layer: torch.Tensor, generator: torch.Generator | None = None, noise: bool = True,
                 width: float = NOISE_MEV) -> torch.Tensor:
    """Raw layer (B, V) MeV -> noise -> normalise -> logit: what flows 2 and 3 model (and flow-3 is given)."""
    if noise:
        layer = add_noise(layer, generator, width)
    return logit(normalise(layer)[0])


def decode_shape(y: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """Flow output (B, V) -> voxel energies (MeV) for layer energies ``energy`` (B,), as the reference does: the
    inverse-logit shape times the energy, not renormalised (see :func:`decode_shape_renormalised`)."""
    return denormalise(inverse_logit(y), energy)


def rescale(layer: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """Scale each (thresholded) layer (B, V) to sum exactly to ``energy`` (B,); an empty layer stays empty."""
    total = layer.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, layer * (energy.unsqueeze(-1) / total.clamp_min(1e-30)), layer)


def no_voxel_hit(y: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """(B,) True where a layer with energy would have no voxel over the threshold: the flow output ``y`` (B, V)
    times the energy, cut as :func:`decode_shape_renormalised` cuts it first."""
    return (apply_threshold(inverse_logit(y) * energy.unsqueeze(-1)).amax(dim=-1) <= 0) & (energy > 0)


def decode_shape_renormalised(y: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """Flow output (B, V) -> thresholded voxel energies (MeV) summing exactly to ``energy`` (B,).

    The cut is made on the shape times the energy, unnormalised: the flows model (e + u) / (E + sum u), so that
    product is the energy each voxel was meant to carry. Normalising first would inflate a sample whose fractions
    all sit at the noise level (the flow's "no voxel hit" failure, common in sparse layers) into a layer with
    every voxel lit. The survivors are then scaled to the layer energy, which moves energy between voxels but never
    changes E_layer or E_tot. A second cut catches voxels a scale-down pushed under the threshold; its rescaling
    only scales up. A layer with energy but no voxel left keeps the flow's most probable voxel: in the data, a
    layer has energy only if one of its voxels passed the threshold.
    """
    raw = inverse_logit(y)
    layer = raw * energy.unsqueeze(-1)
    for _ in range(2):
        layer = rescale(apply_threshold(layer), energy)
    lost = (layer.sum(dim=-1) <= 0) & (energy > 0)
    hot = torch.zeros_like(layer).scatter_(-1, raw.argmax(dim=-1, keepdim=True), energy.unsqueeze(-1))
    return torch.where(lost.unsqueeze(-1), hot, layer)
