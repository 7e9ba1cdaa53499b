"""First principal component of each cone's aligned, masked images (thesis eq. 4.5), batched."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Components:
    """Per cone: scores rho of its members, eigen-image, mean image, share of variance explained."""

    scores: torch.Tensor  # (C, P) float64, zero at padding
    eigenimage: torch.Tensor  # (C, D) unit norm
    mean: torch.Tensor  # (C, D)
    explained: torch.Tensor  # (C,) first eigenvalue / total variance


def first_component(images: torch.Tensor, valid: torch.Tensor) -> Components:
    """First principal component of each cone's rows `images` (C, P, D); padding rows have valid False.

    Works on the smaller of the P x P Gram and the D x D covariance matrix, in float64 (eigh is exact
    and deterministic, unlike randomised low-rank PCA). The sign is fixed so that the eigen-image sums
    to a non-negative value; which class is which is settled later by the graph.
    """
    x = images.to(torch.float64) * valid[..., None]
    n = valid.sum(dim=1).clamp(min=1).to(torch.float64)
    mean = x.sum(dim=1) / n[:, None]
    centred = (x - mean[:, None]) * valid[..., None]
    if centred.shape[1] <= centred.shape[2]:
        values, vectors = torch.linalg.eigh(centred @ centred.transpose(1, 2))
        top, v = values[:, -1].clamp(min=1e-300), vectors[:, :, -1]
        eigenimage = torch.einsum("cpd,cp->cd", centred, v) / top.sqrt()[:, None]
    else:
        values, vectors = torch.linalg.eigh(centred.transpose(1, 2) @ centred)
        top, eigenimage = values[:, -1].clamp(min=1e-300), vectors[:, :, -1]
    sign = torch.where(eigenimage.sum(dim=1) < 0, -1.0, 1.0).to(torch.float64)
    eigenimage = eigenimage * sign[:, None]
    scores = torch.einsum("cpd,cd->cp", centred, eigenimage) * valid
    total = (centred * centred).sum(dim=(1, 2)).clamp(min=1e-300)
    return Components(scores=scores, eigenimage=eigenimage, mean=mean, explained=top / total)
