import copy

import pytest
import timm
import torch
from torch import nn

from clinadapt.models import load_model
from clinadapt.models.pooling import ChannelsLastMaxPool2d, channels_last_pooling


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "ceil_mode", "shape"),
    [
        (3, 2, 1, False, (4, 5, 17, 16)),
        (2, 2, 0, True, (3, 8, 9, 11)),
        (3, 1, 1, False, (2, 3, 6, 6)),
    ],
)
def test_channels_last_max_pool_matches_torch_values_and_gradients(
    kernel, stride, padding, ceil_mode, shape
):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    x[0, 0, :3, :3] = 1.0  # ties: the gradient goes where torch's kernel sends it
    ref_pool = nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)
    fast_pool = ChannelsLastMaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, fast = ref_pool(a), fast_pool(b)
    assert torch.equal(ref, fast)
    assert fast.is_contiguous()  # the next layer sees the layout it would have seen
    g = torch.randn_like(ref)
    ref.backward(g)
    fast.backward(g)
    assert torch.equal(a.grad, b.grad)
    # unbatched input and indices take torch's own path
    assert torch.equal(fast_pool(x[0]), ref_pool(x[0]))
    idx_pool = ChannelsLastMaxPool2d(kernel, stride, padding, return_indices=True)
    values, indices = idx_pool(x)
    ref_values, ref_indices = nn.MaxPool2d(kernel, stride, padding, return_indices=True)(x)
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)


def test_timm_resnet_pools_channels_last_with_the_same_outputs():
    torch.manual_seed(0)
    plain = timm.create_model(
        "resnet18", pretrained=False, layers=(1, 1, 1, 1), channels=(8, 8, 8, 8), num_classes=3
    )
    fast = copy.deepcopy(plain)
    assert channels_last_pooling(fast) == 1
    assert type(fast.maxpool) is ChannelsLastMaxPool2d
    assert (fast.maxpool.kernel_size, fast.maxpool.stride, fast.maxpool.padding) == (3, 2, 1)
    assert channels_last_pooling(fast) == 0  # already swapped
    x = torch.randn(4, 3, 32, 32)
    plain.train(), fast.train()
    plain(x).square().sum().backward()
    fast(x).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    plain.eval(), fast.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), fast(x))
    # the registered timm models get it at load time
    assert type(load_model("tiny-resnet").image_encoder.maxpool) is ChannelsLastMaxPool2d
