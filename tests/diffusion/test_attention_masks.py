"""attention_to_labels on hand-made maps: what a user sees in the label map."""
import pytest
import torch

from dsdiff.diffusion.masks import attention_to_labels, refine


def eye(n: int) -> torch.Tensor:
    return torch.eye(n)


def blob(h: int, w: int, top: int, left: int, height: int, width: int, value: float = 1.0) -> torch.Tensor:
    m = torch.zeros(h, w)
    m[top:top + height, left:left + width] = value
    return m


def block_diagonal(side: int) -> torch.Tensor:
    """Row-stochastic S on a side x side grid: the top half attends uniformly to the top half, same below."""
    n, half = side * side, side * side // 2
    s = torch.zeros(n, n)
    s[:half, :half] = 1.0 / half
    s[half:, half:] = 1.0 / half
    return s


def test_blob_gets_exactly_its_region():
    a, b = blob(32, 32, 4, 4, 10, 12), blob(32, 32, 20, 18, 8, 8)
    labels, maps = attention_to_labels(torch.stack([a, b]), eye(1024), [12, 15], size=32)
    expected = torch.zeros(32, 32, dtype=torch.long)
    expected[a > 0] = 12
    expected[b > 0] = 15
    assert torch.equal(labels, expected)
    assert maps.shape == (2, 32, 32) and maps.min() >= 0 and maps.max() <= 1


def test_blob_survives_both_upsamplings():
    cross = blob(16, 16, 4, 4, 6, 6)[None]  # 16x16 cross -> 32x32 self grid -> 64x64 image
    labels, _ = attention_to_labels(cross, eye(1024), [7], size=64)
    assert labels.shape == (64, 64)
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[16 + 2:40 - 2, 16 + 2:40 - 2] = True  # the blob's 64px footprint, 2px in from its edges
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[16 - 3:40 + 3, 16 - 3:40 + 3] = False
    assert (labels[inside] == 7).all()
    assert (labels[outside] == 0).all()


def test_uncertainty_band_gets_ignore_index():
    cross = blob(8, 8, 0, 0, 4, 8) + blob(8, 8, 4, 0, 2, 8, value=0.55)  # rows 0-3: 1.0, rows 4-5: 0.55, rest 0
    labels, _ = attention_to_labels(cross[None], eye(64), [3], tau=0, size=8)
    assert (labels[:4] == 3).all()
    assert (labels[4:6] == 255).all()
    assert (labels[6:] == 0).all()
    labels, _ = attention_to_labels(cross[None], eye(64), [3], tau=0, size=8, alpha=0.5, ignore_index=99)
    assert (labels[4:6] == 3).all(), "alpha == beta leaves no uncertain band"


def test_thresholds_are_inclusive_where_the_contract_says():
    cross = torch.tensor([[[1.0, 0.6, 0.5, 0.4999, 0.0]]])  # max >= alpha: class; max < beta: background
    labels, _ = attention_to_labels(cross, eye(5), [4], tau=0, size=(1, 5), self_hw=(1, 5))
    assert labels.tolist() == [[4, 4, 255, 0, 0]]


def test_tau_zero_means_no_refinement():
    cross = blob(8, 8, 2, 2, 3, 3)[None]
    uniform = torch.full((64, 64), 1.0 / 64)  # attends everywhere equally: refinement flattens any map
    raw, _ = attention_to_labels(cross, uniform, [5], tau=0, size=8)
    assert torch.equal(raw, (cross[0] > 0).long() * 5)
    refined, _ = attention_to_labels(cross, uniform, [5], tau=1, size=8)
    assert (refined == 0).all(), "a flat refined map normalises to 0: background everywhere"


def test_block_diagonal_self_attention_spreads_only_inside_its_block():
    cross = torch.zeros(1, 8, 8)
    cross[0, 1, 5] = 1.0  # one hot spot in the top half
    s = block_diagonal(8)
    spread = refine(s[None], cross.flatten(1).T[None], tau=2)[0, :, 0]
    assert (spread[:32] > 0).all() and (spread[32:] == 0).all()
    labels, _ = attention_to_labels(cross, s, [9], tau=4, size=8)
    assert (labels[:4] == 9).all() and (labels[4:] == 0).all()


def test_iterated_products_equal_matrix_power_but_never_call_it(monkeypatch):
    g = torch.Generator().manual_seed(0)
    s = torch.softmax(torch.randn(64, 64, generator=g, dtype=torch.float64), dim=-1)
    a = torch.rand(64, 3, generator=g, dtype=torch.float64)
    expected = torch.linalg.matrix_power(s, 4) @ a

    def forbidden(*args, **kwargs):
        raise AssertionError("matrix_power called")

    monkeypatch.setattr(torch.linalg, "matrix_power", forbidden)
    torch.testing.assert_close(refine(s, a, 4), expected)
    attention_to_labels(a.T.reshape(3, 8, 8), s, [1, 2, 3], size=8)


def test_batch_dimension_matches_per_sample_calls():
    g = torch.Generator().manual_seed(1)
    cross = torch.rand(2, 3, 4, 4, generator=g)
    s = torch.softmax(torch.randn(2, 64, 64, generator=g), dim=-1)
    labels, maps = attention_to_labels(cross, s, [1, 4, 6], size=16)
    assert labels.shape == (2, 16, 16) and maps.shape == (2, 3, 16, 16)
    for i in range(2):
        one_labels, one_maps = attention_to_labels(cross[i], s[i], [1, 4, 6], size=16)
        assert torch.equal(labels[i], one_labels)
        torch.testing.assert_close(maps[i], one_maps)


def test_no_class_gives_all_background():
    labels, maps = attention_to_labels(torch.zeros(0, 4, 4), eye(64), [], size=(8, 6))
    assert labels.shape == (8, 6) and (labels == 0).all() and maps.shape == (0, 8, 6)


def test_non_square_self_grid_with_self_hw():
    cross = blob(4, 8, 0, 0, 4, 4)[None]
    labels, _ = attention_to_labels(cross, eye(32), [2], size=(4, 8), self_hw=(4, 8))
    assert (labels[:, :4] == 2).all() and (labels[:, 4:] == 0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 0.4, "beta": 0.5}, "alpha"),
        ({"tau": -1}, "tau"),
        ({"class_ids": [1]}, "class_ids has 1"),
        ({"self_attn": torch.eye(60)}, "not a square grid"),
        ({"self_attn": torch.eye(64)[None]}, "cross must be"),
        ({"self_attn": torch.ones(64, 63)}, "square"),
        ({"self_hw": (4, 4)}, "self_hw"),
    ],
)
def test_bad_arguments_say_what_is_wrong(kwargs, match):
    args = {"cross": torch.rand(2, 4, 4), "self_attn": torch.eye(64), "class_ids": [1, 2], "size": 8}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        attention_to_labels(args.pop("cross"), args.pop("self_attn"), args.pop("class_ids"), **args)
