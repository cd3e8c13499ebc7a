"""kvdb.kernels: the transposed product for short passes is the same linear map, only where asked, and undone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kvdb.kernels import transposed_rows


class Scaled(nn.Linear):  # a subclass with its own forward (as quantised or adapter layers have)
    def forward(self, x):
        return 2 * super().forward(x)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 40, bias=False), Scaled(40, 16))


@pytest.mark.parametrize("shape", [(1, 3, 32), (3, 32), (2, 2, 32)])
def test_chosen_row_counts_compute_the_same_map(shape):
    net = _net()
    x = torch.randn(*shape)
    expected = net(x)
    with transposed_rows(net, {3, 4}):
        got = net(x)
        assert "forward" in vars(net[0]) and "forward" not in vars(net[2])  # subclasses keep their own forward
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_other_row_counts_take_the_stock_kernel_bit_for_bit():
    net = _net()
    x = torch.randn(1, 5, 32)
    with transposed_rows(net, {2, 3}):
        inside = net[0](x)
    assert torch.equal(inside, F.linear(x, net[0].weight, net[0].bias))


def test_the_stock_forward_comes_back_even_after_an_error():
    net = _net()
    with pytest.raises(RuntimeError, match="boom"):
        with transposed_rows(net, {2}):
            raise RuntimeError("boom")
    assert not any("forward" in vars(m) for m in net.modules())
    with transposed_rows(net, {1}):  # one row is never transposed: nothing is patched
        assert not any("forward" in vars(m) for m in net.modules())
