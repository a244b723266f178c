from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from trainers.heads import HEADS, build_head


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("batchnorm", [False, True])
def test_head_shapes(kind, batchnorm):
    head, dim = build_head(kind, 16, None, 8, batchnorm)
    out = head.train()(torch.randn(4, 16))
    assert out.shape == (4, dim) and dim == (16 if kind == "none" else 8)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == {"none": 0, "linear": 1, "mlp": 2, "frozen": 2, "deep": 3, "narrow": 2}[kind]
    if kind == "narrow":
        assert linears[0].out_features == 8  # hidden width cut to out_dim (Table 1d)


def test_frozen_head_has_no_trainable_parameters_and_does_not_move():
    head, _ = build_head("frozen", 16, None, 8)
    assert not any(p.requires_grad for p in head.parameters())
    before = [p.clone() for p in head.parameters()]
    trunk = nn.Linear(4, 16)
    opt = torch.optim.SGD([p for p in list(trunk.parameters()) + list(head.parameters()) if p.requires_grad], lr=1.0)
    head(trunk(torch.randn(8, 4))).pow(2).sum().backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, head.parameters()))
    bound = 1 / 16 ** 0.5  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert head[0].weight.abs().max() <= bound
