"""The "AI lens": a small convolutional autoencoder, and a k-NN novelty score in its graph.

The network sees the whole frame resampled to S x S (``nanoscout.analysis.preprocess.fixed_input``) and
reconstructs it through a narrow spatial code. Its intermediate activations and reconstruction
are exported, so a client can show what the encoder responds to (``clients/lens.py``), and the
same ONNX graph computes the frame's novelty error.

Architecture (S = 256, channels in brackets)::

    image (1) ─ enc1 3x3/2 ─► (16, S/2) ─ enc2 3x3/2 ─► (32, S/4) ─ enc3 3x3/2 ─► (32, S/8)
              ─ enc4 3x3/2 ─► code (CODE_CHANNELS, S/16)
    code ─ up 4x4/2 ─► (32, S/8) ─ up ─► (32, S/4) ─ up ─► (16, S/2) ─ up ─► (8, S) ─ 3x3 ─► (1, S)

All encoder stages are ReLU convolutions; the decoder mirrors them with transposed
convolutions and ends in a linear 3x3 convolution (normalised intensities are not bounded to
0..1). :class:`LensExport` wraps the network for ONNX: it returns the per-frame novelty error,
the plain reconstruction MSE, the reconstruction and the selected activations, in
:data:`OUTPUT_NAMES` order.

Why the novelty error is not the plain reconstruction MSE: a small convolutional autoencoder
is a generic image compressor. Its pixel MSE measures how much fine detail and noise a frame
holds far more than how unusual it is (on validation frames, seeds 5 000 000+, the plain MSE
separated usual from novel fields with AUROC 0.57: a smooth out-of-focus frame reconstructs
better than any usual one). Nor are first-order statistics of the activations enough (log mean
/ spread of every channel under a Gaussian: validation AUROC 0.78, rods 0.57): rods, wires,
films, defocus and contamination differ from particle fields in *second-order* and local
statistics. :func:`frame_features` therefore describes a frame by texture statistics -
orientation coherence of the structure tensor and intensity moments at 4 scales, the same per
local window (largest / spread) and coarse background levels after removing a plane, and the
channel correlations (normalised Gram matrix) of enc1 on the input pooled 2x and 4x - and
``error`` is the mean squared distance per feature from the frame's standardised, squashed
features to its :data:`K_NEIGHBOURS` nearest rows of a bank of usual training frames (each in 4
orientations), computed in the graph as one matrix product and a TopK
(:func:`fit_feature_bank`). Every choice here (feature groups, k-NN instead of a Gaussian, k,
the squash, the 4x bank) was made on validation seeds (``nanoscout.training.evaluate_lens --split
validation``); ``mse`` is still exported.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "CODE_CHANNELS",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "SIZE",
    "K_NEIGHBOURS",
    "N_FEATURES",
    "LensAE",
    "LensExport",
    "fit_feature_bank",
    "frame_features",
    "squash",
]

#: fixed input side, px (the frame is resampled to SIZE x SIZE)
SIZE = 256
#: channels of the spatial code at SIZE / 16
CODE_CHANNELS = 8
INPUT_NAME = "image"
#: activations the ONNX graph exposes, with their meaning
ACTIVATIONS: dict[str, str] = {
    "act_enc1": "first encoder stage after ReLU, 16 channels at S/2 (edges, blobs, noise)",
    "act_enc2": "second encoder stage after ReLU, 32 channels at S/4 (particle parts, outlines)",
    "act_code": f"the code, {CODE_CHANNELS} channels at S/16 (all the decoder gets)",
}
OUTPUT_NAMES: tuple[str, ...] = ("error", "mse", "reconstruction", *ACTIVATIONS)


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU(inplace=True))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1),
                         nn.ReLU(inplace=True))


class LensAE(nn.Module):
    """Convolutional autoencoder, input (N, 1, H, W) with H, W multiples of 16."""

    def __init__(self, code_channels: int = CODE_CHANNELS) -> None:
        super().__init__()
        self.code_channels = code_channels
        self.enc1 = _down(1, 16)
        self.enc2 = _down(16, 32)
        self.enc3 = _down(32, 32)
        # the code is linear: a ReLU here would waste half of a narrow bottleneck
        self.enc4 = nn.Conv2d(32, code_channels, 3, stride=2, padding=1)
        self.dec = nn.Sequential(_up(code_channels, 32), _up(32, 32), _up(32, 16), _up(16, 8),
                                 nn.Conv2d(8, 1, 3, padding=1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (enc1, enc2, code) activations of ``x``."""
        a1 = self.enc1(x)
        a2 = self.enc2(a1)
        code = self.enc4(self.enc3(a2))
        return a1, a2, code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the reconstruction of ``x`` (same shape)."""
        return self.dec(self.encode(x)[2])


_SOBEL = ((-0.125, 0.0, 0.125), (-0.25, 0.0, 0.25), (-0.125, 0.0, 0.125))
#: input poolings and structure-tensor windows (px) of the global orientation statistics
ORIENT_SCALES: tuple[int, ...] = (1, 2, 4, 8)
ORIENT_WINDOWS: tuple[int, ...] = (4, 16)
#: (input pooling, window) pairs of the local (max / spread over windows) statistics
LOCAL_SCALES: tuple[tuple[int, int], ...] = ((1, 8), (2, 8), (4, 8), (2, 16))
#: input poolings at which the enc1 channel correlations are taken
GRAM_POOLS: tuple[int, ...] = (2, 4)
#: neighbours averaged in the k-NN novelty distance
K_NEIGHBOURS = 3
#: standardised features z enter the distance as SQUASH * asinh(z / SQUASH): linear near the
#: usual frames, logarithmic in the tails, so one extreme statistic cannot swamp the others
SQUASH = 2.0
#: length of the per-frame feature vector of :func:`frame_features`
N_FEATURES = (len(ORIENT_SCALES) * (1 + 2 * len(ORIENT_WINDOWS) + 3)
              + 4 * len(LOCAL_SCALES) + 6 + len(GRAM_POOLS) * 16 * 15 // 2)


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the Sobel derivatives (d/dx, d/dy) of (N, 1, H, W) ``x``, same shape."""
    k = np.asarray(_SOBEL, np.float32)
    g = nn.functional.conv2d(x, torch.from_numpy(np.stack([k, k.T])[:, None]), padding=1)
    return g[:, :1], g[:, 1:]


def _structure(gx: torch.Tensor, gy: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (anisotropy, trace) of the structure tensor averaged over w x w windows.

    anisotropy = lambda1 - lambda2 and trace = lambda1 + lambda2 (gradient energy); their ratio
    is the coherence, 1 for a straight edge or line, 0 for an isotropic texture.
    """
    pool = nn.functional.avg_pool2d
    jxx, jyy, jxy = pool(gx * gx, w), pool(gy * gy, w), pool(gx * gy, w)
    return torch.sqrt((jxx - jyy) ** 2 + 4.0 * jxy * jxy + 1e-12), jxx + jyy


def _mean(a: torch.Tensor) -> torch.Tensor:
    return torch.mean(a, dim=(1, 2, 3))


def _sd(a: torch.Tensor) -> torch.Tensor:
    m = torch.mean(a, dim=(1, 2, 3), keepdim=True)
    return torch.sqrt(torch.mean((a - m) ** 2, dim=(1, 2, 3)))


def _orientation_stats(x: torch.Tensor) -> torch.Tensor:
    """Global texture statistics of the input at 4 scales, (N, 32).

    Per input pooling s: log gradient energy; per structure-tensor window w the energy-weighted
    and the plain mean coherence; log variance, skewness and log kurtosis of the intensities.
    """
    out = []
    for s in ORIENT_SCALES:
        xs = nn.functional.avg_pool2d(x, s) if s > 1 else x
        gx, gy = _gradients(xs)
        out.append(torch.log(_mean(gx * gx + gy * gy) + 1e-8))
        for w in ORIENT_WINDOWS:
            an, tr = _structure(gx, gy, w)
            out += [torch.sum(an, dim=(1, 2, 3)) / (torch.sum(tr, dim=(1, 2, 3)) + 1e-8),
                    _mean(an / (tr + 1e-6))]
        d = xs - torch.mean(xs, dim=(1, 2, 3), keepdim=True)
        v = _mean(d * d)
        out += [torch.log(v + 1e-8), _mean(d ** 3) / (v + 1e-8) ** 1.5,
                torch.log(_mean(d ** 4) / (v + 1e-8) ** 2 + 1e-3)]
    return torch.stack(out, dim=1)


def _plane_residual_matrix(g: int) -> torch.Tensor:
    """Return the (g², g²) projection that removes the best-fitting plane from a g x g grid.

    Computed with numpy so that an ONNX trace sees a constant (no QR in the graph).
    """
    yy, xx = np.meshgrid(np.linspace(-1, 1, g), np.linspace(-1, 1, g), indexing="ij")
    q, _ = np.linalg.qr(np.stack([np.ones(g * g), yy.ravel(), xx.ravel()], 1))
    return torch.from_numpy((np.eye(g * g) - q @ q.T).astype(np.float32))


def _local_stats(x: torch.Tensor) -> torch.Tensor:
    """Statistics of local windows, (N, 22): what a global average hides.

    Per (pooling, window): the largest and the spread of the energy-weighted window coherence,
    the largest and smallest window log energy relative to the mean; then on a coarse grid of
    local background levels (maximum, minimum and mean of S/4 pixels over 8 x 8 cells) the
    log spread and the largest deviation after removing a plane (an illumination gradient),
    relative to the frame's intensity spread (contamination blobs, charging patches).
    """
    out = []
    for s, w in LOCAL_SCALES:
        xs = nn.functional.avg_pool2d(x, s) if s > 1 else x
        an, tr = _structure(*_gradients(xs), w)
        weight = torch.clamp(tr / (torch.mean(tr, dim=(1, 2, 3), keepdim=True) + 1e-8), 0.0, 1.0)
        coh = an / (tr + 1e-8) * weight
        le = torch.log(tr + 1e-8)
        out += [torch.amax(coh, dim=(1, 2, 3)), _sd(coh),
                torch.amax(le, dim=(1, 2, 3)) - _mean(le), _mean(le) - torch.amin(le, dim=(1, 2, 3))]
    spread = _sd(x) + 1e-3
    small = nn.functional.avg_pool2d(x, 4)
    grid = small.shape[-1] // 8
    proj = _plane_residual_matrix(grid).to(x.device)
    for v in (nn.functional.max_pool2d(small, 8), -nn.functional.max_pool2d(-small, 8),
              nn.functional.avg_pool2d(small, 8)):
        r = v.reshape(v.shape[0], grid * grid) @ proj
        out += [torch.log(torch.sqrt(torch.mean(r * r, dim=1)) / spread + 1e-3),
                torch.amax(torch.abs(r), dim=1) / spread]
    return torch.stack(out, dim=1)


def _channel_correlations(a: torch.Tensor) -> torch.Tensor:
    """Upper triangle (no diagonal) of the channel correlation matrix of ``a``, (N, C(C-1)/2)."""
    n, c, h, w = a.shape
    f = a.reshape(n, c, h * w)
    d = f - torch.mean(f, dim=2, keepdim=True)
    cov = d @ d.transpose(1, 2) / (h * w)
    sd = torch.sqrt(torch.diagonal(cov, dim1=1, dim2=2) + 1e-8)
    corr = cov / (sd[:, :, None] * sd[:, None, :])
    k = int(a.shape[1])  # a Python int even while tracing: the indices are graph constants
    rows, cols = np.triu_indices(k, 1)
    return torch.index_select(corr.reshape(n, c * c), 1, torch.from_numpy(rows * k + cols))


def frame_features(ae: LensAE, x: torch.Tensor) -> torch.Tensor:
    """Return the (N, N_FEATURES) per-frame statistics the novelty error is measured on.

    Orientation and intensity statistics of the input at 4 scales (:func:`_orientation_stats`,
    32), local-window statistics (:func:`_local_stats`, 22) and the channel correlations (the
    normalised Gram matrix, "style") of the lens's first encoder stage applied to the input
    pooled 2x and 4x (2 x 120): second-order texture statistics in which rods, wires, films,
    defocus and contamination differ from particle fields.
    """
    feats = [_orientation_stats(x), _local_stats(x)]
    for s in GRAM_POOLS:
        feats.append(_channel_correlations(ae.enc1(nn.functional.avg_pool2d(x, s))))
    return torch.cat(feats, dim=1)


def squash(z: torch.Tensor) -> torch.Tensor:
    """Return SQUASH * asinh(z / SQUASH) of standardised features ``z`` (same shape).

    Written out (sign · log(|t| + sqrt(t² + 1))) because opset 17 export lacks aten::asinh.
    """
    t = z / SQUASH
    return SQUASH * torch.sign(t) * torch.log(torch.abs(t) + torch.sqrt(t * t + 1.0))


def fit_feature_bank(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (mean, scale, bank) of (N, D) training features for the k-NN distance.

    mean and scale (standard deviation + 1e-6) standardise every feature; bank is the (N, D)
    standardised and squashed (:func:`squash`) training features themselves.
    """
    f = feats.double()
    mu = f.mean(0)
    sd = f.std(0) + 1e-6
    return mu.float(), sd.float(), squash((f - mu) / sd).float()


class LensExport(nn.Module):
    """ONNX wrapper: image -> (error, mse, reconstruction, act_enc1, act_enc2, act_code).

    ``mse`` (N,): mean over pixels of (reconstruction - image)², normalised intensity units².
    ``error`` (N,): the novelty error, the squared distance per feature from the frame's
    standardised, squashed features z (:func:`frame_features`, :func:`squash`) to its ``k``
    nearest bank rows b (training frames), mean over those k of |z - b|² / D.
    """

    def __init__(self, ae: LensAE, mean: torch.Tensor, scale: torch.Tensor, bank: torch.Tensor,
                 k: int = K_NEIGHBOURS) -> None:
        super().__init__()
        self.ae = ae
        self.k = min(k, int(bank.shape[0]))
        self.register_buffer("feat_mean", mean.reshape(1, -1).float())
        self.register_buffer("feat_scale", scale.reshape(1, -1).float())
        self.register_buffer("bank", bank.float())
        self.register_buffer("bank_sq", torch.sum(bank.float() ** 2, dim=1).reshape(1, -1))
        self.feat_mean: torch.Tensor
        self.feat_scale: torch.Tensor
        self.bank: torch.Tensor
        self.bank_sq: torch.Tensor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Return (error, mse, reconstruction, act_enc1, act_enc2, act_code) for ``x``."""
        a1, a2, code = self.ae.encode(x)
        rec = self.ae.dec(code)
        mse = torch.mean((rec - x) ** 2, dim=(1, 2, 3))
        z = squash((frame_features(self.ae, x) - self.feat_mean) / self.feat_scale)
        d2 = torch.sum(z * z, dim=1, keepdim=True) - 2.0 * z @ self.bank.T + self.bank_sq
        near = torch.topk(d2, self.k, dim=1, largest=False).values
        err = torch.clamp(torch.mean(near, dim=1), min=0.0) / z.shape[1]
        return err, mse, rec, a1, a2, code
