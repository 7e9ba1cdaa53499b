import math

import pytest
import torch

from relion_graphsplit.fourier.geometry import MIRROR, euler_to_matrix
from relion_graphsplit.fourier.projection import project, shift_images
from relion_graphsplit.method import alignment
from relion_graphsplit.method.alignment import align_to_reference, cone_reference
from relion_graphsplit.method.cones import assign_to_cones
from relion_graphsplit.method.preprocess import centre_downsampled


def blob_volume(n: int = 48) -> torch.Tensor:
    """An asymmetric map: a few Gaussian blobs off centre."""
    c = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(n, n, n, dtype=torch.float64)
    for (bx, by, bz), s, a in [((6, 0, 0), 3.0, 1.0), ((-4, 7, 2), 2.5, 0.8), ((0, -6, -5), 2.0, 0.6), ((-7, -3, 6), 2.0, 0.5)]:
        vol += a * torch.exp(-((x - bx) ** 2 + (y - by) ** 2 + (z - bz) ** 2) / (2 * s * s))
    return vol


def centred(images: torch.Tensor, origins: torch.Tensor) -> torch.Tensor:
    """The pipeline's centring: translate each image by +origin in Fourier space."""
    n = images.shape[-1]
    return torch.fft.irfft2(centre_downsampled(torch.fft.rfft2(images), origins, n), s=(n, n))


def test_particles_of_one_cone_align_onto_one_image():
    vol = blob_volume()
    axis_rot, axis_tilt = 30.0, 50.0
    reference = euler_to_matrix(torch.tensor(axis_rot), torch.tensor(axis_tilt), torch.tensor(0.0))
    target = project(vol, reference[None])[0]
    g = torch.Generator().manual_seed(0)
    b = 12
    # Views within ~2 degrees of the axis, any psi, and origins up to 4 pixels.
    rot = axis_rot + torch.randn(b, generator=g, dtype=torch.float64) * 1.5
    tilt = axis_tilt + torch.randn(b, generator=g, dtype=torch.float64) * 1.5
    psi = torch.rand(b, generator=g, dtype=torch.float64) * 360
    A = euler_to_matrix(rot, tilt, psi)
    origins = (torch.rand(b, 2, generator=g, dtype=torch.float64) - 0.5) * 8
    # RELION's particle image(x) = P(x + o): the projection translated by -o.
    raw = torch.fft.irfft2(shift_images(torch.fft.rfft2(project(vol, A)), -origins), s=(48, 48))
    aligned = align_to_reference(centred(raw, origins), A, reference, torch.zeros(b, dtype=torch.bool))
    inner = slice(8, 40)
    for k in range(b):
        corr = torch.corrcoef(torch.stack([aligned[k, inner, inner].flatten(), target[inner, inner].flatten()]))[0, 1]
        assert corr > 0.97, (k, float(corr))
    # Without the in-plane rotation the images do not match: the test can fail.
    unrotated = centred(raw, origins)
    corrs = [
        torch.corrcoef(torch.stack([unrotated[k, inner, inner].flatten(), target[inner, inner].flatten()]))[0, 1]
        for k in range(b)
    ]
    assert min(corrs) < 0.9


def test_mirrored_member_aligns_onto_the_cone_view():
    vol = blob_volume()
    reference = euler_to_matrix(torch.tensor(-20.0), torch.tensor(40.0), torch.tensor(0.0))
    target = project(vol, reference[None])[0]
    # A particle seen from the antipode of a direction near the axis: its image is a mirror of a view
    # near the axis, and grouping finds that through the mirror operator.
    near = euler_to_matrix(torch.tensor([-19.0]), torch.tensor([41.0]), torch.tensor([70.0]))
    A = MIRROR @ near
    raw = project(vol, A)
    axes = reference[2][None]
    cones = assign_to_cones(A, axes, 10.0, torch.eye(3, dtype=torch.float64)[None])
    assert bool(cones.mirrored[0])
    equivalent = cones.rotations(A, torch.eye(3, dtype=torch.float64)[None])
    aligned = align_to_reference(raw, equivalent, cone_reference(axes)[0], cones.mirrored)
    inner = slice(8, 40)
    corr = torch.corrcoef(torch.stack([aligned[0, inner, inner].flatten(), target[inner, inner].flatten()]))[0, 1]
    assert corr > 0.97


@pytest.mark.parametrize("n", [38, 39])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_rotation_samples_what_grid_sample_samples(n, dtype):
    """The CPU's compiled rotation and grid_sample (the alignment on other devices) give the same
    images, mirrored or not, with taps outside the image counted as zero, to the float32 rounding of
    grid_sample's coordinates; no rotation gives the images back."""
    g = torch.Generator().manual_seed(1)
    b = 24
    images = torch.randn(b, n, n, generator=g, dtype=torch.float64).to(dtype)
    phi = torch.rand(b, generator=g, dtype=torch.float64) * 2 * math.pi
    flip = torch.where(torch.arange(b) % 2 == 0, 1.0, -1.0).to(torch.float64)
    c, s = torch.cos(phi), torch.sin(phi)
    matrix = torch.stack([torch.stack([c, -s], dim=-1), torch.stack([flip * s, flip * c], dim=-1)], dim=-2)
    compiled = alignment._sample(images, matrix)
    reference = alignment._grid_sample(images, matrix)
    assert compiled.dtype == dtype and compiled.shape == images.shape
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    assert float((compiled - reference).abs().max()) < tolerance
    assert float(reference.abs().max()) > 1.0  # images, not zeros
    identity = torch.eye(2, dtype=torch.float64).expand(b, 2, 2)
    torch.testing.assert_close(alignment._sample(images, identity), images, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_rotation_samples_only_inside_the_mask(dtype):
    """With a mask, the compiled rotation gives the rotated images times the mask bit for bit (the
    classification's values do not depend on the pixels it skips), and grid_sample's way the same to
    rounding; pixels of mask 0 are 0 even where the taps meet values that are not finite."""
    g = torch.Generator().manual_seed(2)
    b, n = 16, 38
    images = torch.randn(b, n, n, generator=g, dtype=torch.float64).to(dtype)
    phi = torch.rand(b, generator=g, dtype=torch.float64) * 2 * math.pi
    c, s = torch.cos(phi), torch.sin(phi)
    matrix = torch.stack([torch.stack([c, -s], dim=-1), torch.stack([s, c], dim=-1)], dim=-2)
    coords = torch.arange(n, dtype=torch.float64) - n // 2
    radius = torch.sqrt(coords[:, None] ** 2 + coords[None, :] ** 2)
    mask = ((12 - radius) / 3).clamp(0, 1).to(dtype)  # 1 inside, a soft edge, 0 beyond radius 12
    assert 0 < float((mask == 0).float().mean()) < 1 and bool(((mask > 0) & (mask < 1)).any())
    masked = alignment._sample(images, matrix, mask)
    assert torch.equal(masked, alignment._sample(images, matrix) * mask)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    assert float((masked - alignment._grid_sample(images, matrix) * mask).abs().max()) < tolerance
    corners = images.clone()
    corners[:, :3, :3] = float("nan")  # beyond the mask's reach (radius 12 + 2 taps + 1)
    assert torch.equal(alignment._sample(corners, matrix, mask), masked)
