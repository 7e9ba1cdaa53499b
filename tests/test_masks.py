import torch

from relion_graphsplit.fourier.geometry import euler_to_matrix
from relion_graphsplit.method.masks import class_maps_mask, consensus_mask, project_mask, resample_volume

BOX = 32


def ball(box: int, radius: float, centre: tuple[int, int, int]) -> torch.Tensor:
    z, y, x = torch.meshgrid(*[torch.arange(box, dtype=torch.float32)] * 3, indexing="ij")
    r2 = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2
    return (r2 <= radius**2).to(torch.float32)


def test_consensus_mask_covers_the_particle_not_the_noise():
    c = BOX // 2
    apix = 2.0
    particle = ball(BOX, 5.0, (c, c, c))
    blob = 0.3 * ball(BOX, 1.5, (4, 4, 4))  # a small noise blob above the threshold, away from the particle
    mask = consensus_mask(particle + blob, apix, lowpass=6.0, threshold=0.2, extend=4.0, edge=6.0)
    assert mask.shape == (BOX, BOX, BOX) and mask.dtype == torch.float32
    assert float(mask.min()) >= 0.0 and float(mask.max()) == 1.0
    assert mask[c, c, c] == 1 and mask[c, c, c + 6] == 1  # inside, and within the 4 A extension
    assert mask[4, 4, 4] == 0  # the blob is not the largest connected part
    assert mask[c, c, BOX - 1] == 0 and mask[0, 0, 0] == 0
    edge = mask[c, c, c + 5 :]
    assert torch.all(edge[1:] <= edge[:-1]) and 0 < float(edge[edge < 1].max()) < 1  # a soft, falling edge


def test_consensus_mask_extension_in_angstrom():
    c = BOX // 2
    particle = ball(BOX, 5.0, (c, c, c))
    narrow = consensus_mask(particle, 1.0, lowpass=4.0, threshold=0.2, extend=2.0, edge=3.0)
    wide = consensus_mask(particle, 1.0, lowpass=4.0, threshold=0.2, extend=6.0, edge=3.0)
    assert float(wide.sum()) > float(narrow.sum())
    assert narrow[c, c, c + 10] == 0 and wide[c, c, c + 10] == 1


def test_projected_mask_follows_the_viewing_direction():
    # A box-shaped mask off centre along +x of the map: seen down z it is off centre along +x of the
    # image; seen down x (rot 0, tilt 90) its ray passes through the centre.
    mask = torch.zeros(BOX, BOX, BOX)
    c = BOX // 2
    mask[c - 2 : c + 3, c - 2 : c + 3, c + 6 : c + 11] = 1.0
    views = euler_to_matrix(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 90.0]), torch.tensor([0.0, 0.0]))
    down_z, down_x = project_mask(mask, views)
    ys, xs = torch.nonzero(down_z, as_tuple=True)
    assert xs.min() >= c + 5 and xs.max() <= c + 11 and ys.min() >= c - 3 and ys.max() <= c + 3
    # Viewing along +x (tilt 90): map x becomes image depth; map z maps onto image x.
    assert down_x[c, c] and down_x.sum() < down_z.numel() / 10


def test_resample_keeps_extent():
    mask = ball(BOX, 8.0, (BOX // 2,) * 3)
    small = resample_volume(mask, 16)
    assert small.shape == (16, 16, 16)
    assert small[8, 8, 8] > 0.99 and small[8, 8, 14] < 0.05


def test_class_maps_mask_keeps_a_part_faint_in_the_consensus():
    """A part in 20% of the particles is at 20% in the consensus but whole in its class map."""
    c, apix = BOX // 2, 2.0
    core = ball(BOX, 5.0, (c, c, c))
    part = ball(BOX, 3.0, (c, c, c + 9))
    consensus = core + 0.2 * part
    scale = 2.0  # the difference maps carry the images' grey scale
    differences = [scale * 0.8 * part, -scale * 0.2 * part]  # class 1 has the part, class 2 lacks it
    from_consensus = consensus_mask(consensus, apix, threshold=0.3, extend=2.0)
    from_classes = class_maps_mask(consensus, differences, scale, apix, threshold=0.3, extend=2.0)
    assert from_consensus[c, c, c + 10] < 0.5 < from_classes[c, c, c + 10] == 1
    assert from_classes[c, c, c] == 1 and from_classes[0, 0, 0] == 0
