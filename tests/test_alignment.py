import torch

from relion_graphsplit.alignment import align_to_reference, cone_reference
from relion_graphsplit.geometry import MIRROR, euler_to_matrix
from relion_graphsplit.grouping import assign_to_cones
from relion_graphsplit.preprocess import centre_downsampled
from relion_graphsplit.projection import project, shift_images


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
    aligned = align_to_reference(raw, cones.rotation, cone_reference(axes)[0], cones.mirrored)
    inner = slice(8, 40)
    corr = torch.corrcoef(torch.stack([aligned[0, inner, inner].flatten(), target[inner, inner].flatten()]))[0, 1]
    assert corr > 0.97
