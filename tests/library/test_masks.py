import torch

from xbar.masks import ColumnShiftMask, ElementBinaryMask, mask_values, shift_values


def test_mask_value_tables():
    assert mask_values(3).tolist() == [0, 0.125, 0.25, 0.5, 1]
    assert mask_values(1).tolist() == [0, 0.5, 1]
    assert mask_values(0).tolist() == [0, 1]  # XBM
    assert shift_values(2).tolist() == [0, 0.25, 0.5]  # (the range 0..3 is params' to check: TaskSpec)


def test_column_shift_mask_eval_values_and_codes():
    mask = ColumnShiftMask(6, shift_levels=3).eval()
    with torch.no_grad():  # sigma: .95, .62, .38, .18, .076, .0067
        mask.real.copy_(torch.tensor([3.0, 0.5, -0.5, -1.5, -2.5, -5.0]))
    assert mask.codes().dtype == torch.uint8
    assert mask.codes().tolist() == [4, 4, 3, 1, 1, 0]
    assert mask().tolist() == [1, 1, 0.5, 0.125, 0.125, 0]
    assert torch.equal(mask(), mask())  # no noise in eval


def test_fewer_shift_levels_and_binary_xbm():
    real = torch.linspace(-6, 6, 101)
    for n in range(4):
        mask = ColumnShiftMask(len(real), shift_levels=n).eval()
        with torch.no_grad():
            mask.real.copy_(real)
        values = set(mask().tolist())
        assert values <= set(mask_values(n).tolist())
    xbm = ColumnShiftMask(len(real), shift_levels=0).eval()
    with torch.no_grad():
        xbm.real.copy_(real)
    assert torch.equal(xbm(), (real > 0).float())


def test_training_samples_table_values_seeded():
    mask = ColumnShiftMask(500, shift_levels=3, init=0.5).train()
    torch.manual_seed(0)
    a = mask()
    torch.manual_seed(0)
    b = mask()
    assert torch.equal(a, b)  # the Gumbel noise comes from the seeded global generator
    table = mask_values(3)
    assert torch.isclose(a.detach().unsqueeze(1), table).any(1).all()
    assert 0 < (a < 1).sum() < 500  # noise: some columns drop to their shift value, most stay 1


def test_straight_through_gradients():
    mask = ColumnShiftMask(4, shift_levels=3, temperature=0.5).train()
    with torch.no_grad():
        mask.real.copy_(torch.tensor([-1.0, -0.2, 0.3, 2.0]))
    shift = mask.shift_part()
    shift.sum().backward()
    sig = torch.sigmoid(mask.real.detach())
    assert torch.allclose(mask.real.grad, sig * (1 - sig))  # rounding is skipped backward
    mask.real.grad = None
    torch.manual_seed(0)
    binary = mask.binary_part()
    assert set(binary.detach().tolist()) <= {0.0, 1.0}  # hard forward
    binary.sum().backward()
    assert (mask.real.grad > 0).all()  # the soft Gumbel-sigmoid's gradient
    mask.real.grad = None
    mask().sum().backward()
    assert mask.real.grad.abs().sum() > 0


def test_element_binary_mask_piggyback():
    mask = ElementBinaryMask((2, 3))
    assert torch.equal(mask.real.detach(), torch.full((2, 3), 1e-2))
    with torch.no_grad():
        mask.real[0, 0] = 4e-3  # below the 5e-3 threshold
    mask.eval()
    assert mask().tolist() == [[0, 1, 1], [1, 1, 1]]
    assert mask.binary().dtype == torch.bool
    mask.train()
    weights = torch.arange(6.0).view(2, 3)
    (mask() * weights).sum().backward()
    assert torch.equal(mask.real.grad, weights)  # straight-through
