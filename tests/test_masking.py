"""Sequence masks and masked softmax, checked against loops over rows and the course's formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from divekit.errors import DivekitError
from divekit.ops.masking import key_padding_mask, length_mask, masked_softmax, sequence_mask

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def course_sequence_mask(X, valid_len, value=0):
    """d2l's ``sequence_mask`` (in place, on a copy here)."""
    X = X.clone()
    maxlen = X.size(1)
    mask = torch.arange(maxlen, dtype=torch.float32, device=X.device)[None, :] < valid_len[:, None]
    X[~mask] = value
    return X


def course_masked_softmax(X, valid_lens):
    """d2l's ``masked_softmax``: masked scores become -1e6."""
    if valid_lens is None:
        return F.softmax(X, dim=-1)
    shape = X.shape
    if valid_lens.dim() == 1:
        valid_lens = torch.repeat_interleave(valid_lens, shape[1])
    else:
        valid_lens = valid_lens.reshape(-1)
    X = course_sequence_mask(X.reshape(-1, shape[-1]), valid_lens, value=-1e6)
    return F.softmax(X.reshape(shape), dim=-1)


def brute_force_masked_softmax(X, valid_lens):
    """Row by row: softmax over the first ``valid_len`` scores, zeros elsewhere."""
    B, Q, K = X.shape
    lens = valid_lens[:, None].expand(B, Q) if valid_lens.dim() == 1 else valid_lens
    rows = []
    for b in range(B):
        for q in range(Q):
            n = int(lens[b, q])
            kept = F.softmax(X[b, q, :n], dim=-1)
            rows.append(torch.cat((kept, X.new_zeros(K - n))))
    return torch.stack(rows).reshape(B, Q, K)


def random_lengths(shape, K, generator):
    """Lengths in [0, K], with 0 and K always present when there is room."""
    lens = torch.randint(0, K + 1, shape, generator=generator)
    flat = lens.view(-1)
    if flat.numel() >= 2:
        flat[0], flat[-1] = 0, K
    return lens


# --------------------------------------------------------------------------- sequence_mask


def test_sequence_mask_on_the_course_example():
    X = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert sequence_mask(X, torch.tensor([1, 2])).tolist() == [[1, 0, 0], [4, 5, 0]]


def test_sequence_mask_masks_whole_feature_vectors_and_leaves_its_input_alone():
    X = torch.ones(2, 3, 4)
    out = sequence_mask(X, torch.tensor([1, 2]), value=-1)
    assert torch.equal(out[0, 1:], -torch.ones(2, 4)) and torch.equal(out[0, :1], torch.ones(1, 4))
    assert torch.equal(out[1, 2:], -torch.ones(1, 4)) and torch.equal(out[1, :2], torch.ones(2, 4))
    assert torch.equal(X, torch.ones(2, 3, 4))  # the course's version would have changed X


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3), (4, 6, 2, 3)])
def test_sequence_mask_equals_a_loop_and_the_course(dtype, shape):
    g = torch.Generator().manual_seed(0)
    X = (torch.randn(shape, generator=g) * 10).to(dtype)
    valid_len = random_lengths((shape[0],), shape[1] + 2, g)  # some lengths beyond T
    out = sequence_mask(X, valid_len, value=-3)
    expected = X.clone()
    for b in range(shape[0]):
        expected[b, int(valid_len[b]) :] = -3
    assert out.dtype == dtype and out.shape == X.shape
    assert torch.equal(out, expected)
    assert torch.equal(out, course_sequence_mask(X, valid_len, value=-3))


def test_sequence_mask_accepts_real_and_list_lengths():
    X = torch.arange(8.0).reshape(2, 4)
    assert torch.equal(sequence_mask(X, torch.tensor([1.5, 4.0])), sequence_mask(X, [2, 4]))


@pytest.mark.parametrize("device", DEVICES)
def test_sequence_mask_keeps_the_input_device(device):
    X = torch.ones(3, 4, device=device)
    out = sequence_mask(X, torch.tensor([0, 2, 4]))  # lengths on the CPU are moved
    assert out.device == X.device
    assert out.sum().item() == 6


# --------------------------------------------------------------------------- masked_softmax


@pytest.mark.parametrize("per_query", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_masked_softmax_equals_the_brute_force(per_query, seed):
    g = torch.Generator().manual_seed(seed)
    B, Q, K = 4, 5, 6
    X = torch.randn(B, Q, K, generator=g, dtype=torch.float64) * 3
    lens = random_lengths((B, Q) if per_query else (B,), K, g)
    out = masked_softmax(X, lens)
    assert torch.allclose(out, brute_force_masked_softmax(X, lens), atol=1e-12)


def test_masked_softmax_weights_are_exactly_zero_past_the_length_and_rows_sum_to_one():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, 3, 10, generator=g) * 50
    lens = random_lengths((8, 3), 10, g)
    out = masked_softmax(X, lens)
    keep = torch.arange(10) < lens[..., None]
    assert torch.all(out[~keep] == 0)
    sums = out.sum(-1)
    assert torch.allclose(sums[lens > 0], torch.ones(()), atol=1e-6)
    assert torch.all(sums[lens == 0] == 0)  # nothing to attend to: all zeros, never NaN


def test_masked_softmax_on_the_course_example():
    X = torch.rand(2, 2, 4, generator=torch.Generator().manual_seed(2))
    out = masked_softmax(X, torch.tensor([2, 3]))
    assert torch.all(out[0, :, 2:] == 0) and torch.all(out[1, :, 3:] == 0)
    out = masked_softmax(X, torch.tensor([[1, 3], [2, 4]]))
    assert torch.allclose(out[0, 0], torch.tensor([1.0, 0, 0, 0]))
    assert torch.allclose(out[1, 1].sum(), torch.tensor(1.0))


@pytest.mark.parametrize("per_query", [False, True])
def test_masked_softmax_agrees_with_the_course_formula_for_nonempty_rows(per_query):
    g = torch.Generator().manual_seed(3)
    B, Q, K = 6, 4, 9
    X = torch.randn(B, Q, K, generator=g) * 5
    lens = torch.randint(1, K + 1, (B, Q) if per_query else (B,), generator=g)
    assert torch.allclose(masked_softmax(X, lens), course_masked_softmax(X, lens), atol=1e-6)
    # They differ on purpose where a row has nothing valid: uniform there, zeros here.
    lens.view(-1)[0] = 0
    course = course_masked_softmax(X, lens)
    assert torch.allclose(course[0, 0], torch.full((K,), 1 / K))
    assert torch.all(masked_softmax(X, lens)[0, 0] == 0)


def test_masked_softmax_without_lengths_is_softmax():
    X = torch.randn(2, 3, 5)
    assert torch.equal(masked_softmax(X, None), F.softmax(X, dim=-1))


def test_masked_softmax_ignores_nan_and_inf_padding():
    X = torch.randn(2, 3, 5)
    X[:, :, 3:] = float("nan")
    X[1, :, 2] = float("inf")
    out = masked_softmax(X, torch.tensor([3, 2]))
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0, :, :3], F.softmax(X[0, :, :3], dim=-1))


def test_masked_softmax_takes_more_leading_dimensions():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(3, 2, 4, 5, generator=g)  # (B, heads, Q, K)
    lens = random_lengths((3,), 5, g)
    out = masked_softmax(X, lens)
    for h in range(2):
        assert torch.allclose(out[:, h], brute_force_masked_softmax(X[:, h], lens), atol=1e-6)
    lens_q = random_lengths((3, 2, 4), 5, g)
    assert torch.allclose(
        masked_softmax(X, lens_q).reshape(6, 4, 5),
        brute_force_masked_softmax(X.reshape(6, 4, 5), lens_q.reshape(6, 4)),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)]
)
def test_masked_softmax_dtypes(dtype, atol):
    g = torch.Generator().manual_seed(5)
    X = torch.randn(4, 3, 7, generator=g, dtype=torch.float64)
    lens = random_lengths((4, 3), 7, g)
    out = masked_softmax(X.to(dtype), lens)
    assert out.dtype == dtype
    expected = brute_force_masked_softmax(X, lens)
    assert torch.allclose(out.double(), expected, atol=atol)
    assert torch.all(out[expected == 0] == 0)


# --------------------------------------------------------------------------- gradients


def test_masked_softmax_gradcheck_in_float64():
    g = torch.Generator().manual_seed(6)
    X = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    for lens in (torch.tensor([0, 3]), torch.tensor([[1, 0, 4], [2, 3, 0]])):
        assert torch.autograd.gradcheck(lambda x, lens=lens: masked_softmax(x, lens), (X,))


@pytest.mark.parametrize("per_query", [False, True])
def test_masked_softmax_gradient_equals_the_brute_force(per_query):
    g = torch.Generator().manual_seed(7)
    B, Q, K = 3, 4, 6
    X = torch.randn(B, Q, K, generator=g, dtype=torch.float64)
    lens = random_lengths((B, Q) if per_query else (B,), K, g)
    weights = torch.randn(B, Q, K, generator=g, dtype=torch.float64)
    grads = []
    for fn in (masked_softmax, brute_force_masked_softmax):
        x = X.clone().requires_grad_(True)
        (fn(x, lens) * weights).sum().backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-12)
    keep = torch.arange(K) < (lens[:, None, None] if lens.dim() == 1 else lens[..., None])
    assert torch.all(grads[0][~keep.expand(B, Q, K)] == 0)


def test_masked_softmax_under_bf16_autocast_is_finite_and_close():
    g = torch.Generator().manual_seed(8)
    q = torch.randn(4, 5, 8, generator=g, requires_grad=True)
    k = torch.randn(4, 6, 8, generator=g)
    lens = torch.tensor([0, 1, 6, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = masked_softmax(q @ k.transpose(1, 2), lens)
    out.float().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    expected = brute_force_masked_softmax(q.detach() @ k.transpose(1, 2), lens)
    assert torch.allclose(out.float(), expected, atol=2e-2)
    assert torch.all(out[0] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_softmax_keeps_the_input_device(device):
    X = torch.randn(2, 3, 4, device=device)
    out = masked_softmax(X, torch.tensor([0, 2]))
    assert out.device == X.device
    assert torch.allclose(out.cpu(), brute_force_masked_softmax(X.cpu(), torch.tensor([0, 2])))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "lens, match",
    [
        (torch.tensor([1, 2, 3]), r"valid_lens must have shape \(2,\) or \(2, 3\)"),
        (torch.ones(3, 2), r"valid_lens must have shape"),
        (torch.tensor([1, -1]), r"valid_lens must be >= 0, got a length of -1"),
        (torch.tensor([[1.0, float("nan"), 1.0], [1.0, 1.0, 1.0]]), r"must be >= 0"),
        (torch.tensor([True, False]), r"integer or real lengths"),
    ],
)
def test_masked_softmax_rejects_bad_lengths_in_one_line(lens, match):
    with pytest.raises(DivekitError, match=match) as err:
        masked_softmax(torch.randn(2, 3, 4), lens)
    assert "\n" not in str(err.value)


def test_bad_inputs_are_named():
    with pytest.raises(DivekitError, match=r"X must be a tensor of scores"):
        masked_softmax(torch.randn(4), torch.tensor([1]))
    with pytest.raises(DivekitError, match=r"floating-point"):
        masked_softmax(torch.ones(2, 3, dtype=torch.long), torch.tensor([1, 2]))
    with pytest.raises(DivekitError, match=r"valid_len must have shape \(2,\)"):
        sequence_mask(torch.ones(2, 3), torch.tensor([[1, 2]]))
    with pytest.raises(DivekitError, match=r"valid_len must be >= 0"):
        sequence_mask(torch.ones(2, 3), torch.tensor([1, -2]))
    with pytest.raises(DivekitError, match=r"\(B, T\)"):
        sequence_mask(torch.ones(3), torch.tensor([1, 2, 3]))


# ----------------------------------------------------------------------------- key padding
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_key_padding_mask_matches_a_loop_over_rows_and_keys(dtype):
    lengths = torch.tensor([0, 1, 4, 7, 9])  # empty, short, full (7) and longer than T
    T = 7
    mask = key_padding_mask(lengths, T, dtype)
    assert mask.shape == (5, 1, 1, T) and mask.dtype == dtype
    for b, n in enumerate(lengths.tolist()):
        for t in range(T):
            want = 0.0 if t < n else torch.finfo(dtype).min
            assert mask[b, 0, 0, t].item() == want
    keep = length_mask(lengths, T)
    assert keep.dtype == torch.bool and keep.tolist() == [[t < n for t in range(T)]
                                                          for n in lengths.tolist()]


def test_key_padding_mask_in_attention_equals_dropping_the_padded_keys():
    """Scaled dot-product attention with the additive mask gives each row what attention over
    its real keys alone gives (the padded keys cut off): the mask hides them exactly."""
    g = torch.Generator().manual_seed(0)
    B, heads, T, d = 3, 2, 6, 4
    q, k, v = (torch.randn(B, heads, T, d, generator=g) for _ in range(3))
    lengths = torch.tensor([6, 2, 4])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask(lengths, T, q.dtype))
    for b, n in enumerate(lengths.tolist()):
        want = F.scaled_dot_product_attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n])
        torch.testing.assert_close(out[b : b + 1], want, atol=1e-6, rtol=1e-5)

