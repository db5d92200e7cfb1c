"""The SVD update codec: rank rule, exact energy identity, byte counts, error feedback."""

from __future__ import annotations

import math

import pytest
import torch

from fedmic_pipeline.core.codec import (
    ErrorFeedback,
    decode_update,
    encode_update,
    energy_threshold,
    select_rank,
)
from fedmic_pipeline.core.protocol import ConfigurationError, payload_nbytes


def _low_rank(m: int, n: int, rank: int, seed: int = 0, noise: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, rank, generator=g)
    b = torch.randn(rank, n, generator=g)
    return a @ b + noise * torch.randn(m, n, generator=g)


def _shapes(delta: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in delta.items()}


# --- energy schedule ---------------------------------------------------------------


def test_energy_schedule_endpoints_and_midpoint() -> None:
    assert energy_threshold(0, 10) == pytest.approx(0.95)
    assert energy_threshold(9, 10) == pytest.approx(0.98)
    assert energy_threshold(1, 3, 0.9, 1.0) == pytest.approx(0.95)
    assert energy_threshold(0, 1) == pytest.approx(0.95)  # R = 1 -> start
    assert energy_threshold(50, 10) == pytest.approx(0.98)  # clamped past the end


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.0001, float("nan"), float("inf")])
def test_energy_schedule_rejects_bad_energy(bad: float) -> None:
    with pytest.raises(ConfigurationError, match=r"\(0, 1\]"):
        energy_threshold(0, 5, start=bad)
    with pytest.raises(ConfigurationError, match=r"\(0, 1\]"):
        energy_threshold(0, 5, end=bad)
    with pytest.raises(ConfigurationError):
        encode_update({"w": torch.ones(3, 3)}, energy=bad)


def test_energy_schedule_rejects_bad_rounds() -> None:
    with pytest.raises(ConfigurationError, match="num_rounds"):
        energy_threshold(0, 0)
    with pytest.raises(ConfigurationError, match="round"):
        energy_threshold(-1, 5)


# --- rank rule ---------------------------------------------------------------------


def test_select_rank_on_hand_made_spectrum() -> None:
    s = torch.tensor([4.0, 3.0, 0.0])  # energies 16, 9, 0 of 25
    assert select_rank(s, 0.64) == 1  # exactly 16/25: boundary counts as reached
    assert select_rank(s, 0.6400001) == 2
    assert select_rank(s, 1.0) == 2  # trailing zero adds nothing
    s = torch.tensor([10.0, 1.0, 1.0, 1.0, 1.0])  # 100 of 104
    assert select_rank(s, 0.95) == 1
    assert select_rank(s, 0.97) == 2
    assert select_rank(s, 0.98) == 3
    assert select_rank(s, 1.0) == 5


def test_select_rank_zero_and_empty() -> None:
    assert select_rank(torch.zeros(5), 0.95) == 0
    assert select_rank(torch.zeros(0), 0.95) == 0


def test_select_rank_always_reaches_threshold_with_tiny_values() -> None:
    # A spectrum whose float sum would drift: the rule must still stop at <= len(s) and >= 1.
    s = torch.tensor([1e-20] * 7, dtype=torch.float32)
    r = select_rank(s, 1.0)
    assert 1 <= r <= 7
    s = torch.linspace(1.0, 1e-6, 200)
    assert select_rank(s, 1.0) <= 200
    assert select_rank(s, 0.999999) >= 1


# --- encode / decode ---------------------------------------------------------------


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.95, 0.98])
def test_reconstruction_error_equals_dropped_energy(energy: float) -> None:
    d = _low_rank(40, 60, 12, seed=1, noise=0.3)
    payload, stats = encode_update({"w": d}, energy)
    assert "w::U" in payload and "w::V" in payload
    rec = decode_update(payload, {"w": d.shape})["w"]
    s = torch.linalg.svdvals(d.double())
    r = select_rank(s, energy)
    dropped = float((s[r:] ** 2).sum() / (s**2).sum())
    rel_err_sq = float(((d.double() - rec.double()) ** 2).sum() / (d.double() ** 2).sum())
    assert rel_err_sq == pytest.approx(dropped, rel=1e-4, abs=1e-9)
    assert (1.0 - dropped) >= energy - 1e-9
    layer = stats.layers[0]
    assert layer.rank == r and layer.factored
    assert layer.rel_error == pytest.approx(math.sqrt(dropped), rel=1e-4)
    assert layer.energy_kept == pytest.approx(1.0 - dropped, rel=1e-9)


def test_exact_low_rank_matrix_is_recovered_with_its_rank() -> None:
    d = _low_rank(64, 288, 3, seed=2)
    payload, stats = encode_update({"w": d}, 0.98)
    assert payload["w::U"].shape == (64, 3) and payload["w::V"].shape == (288, 3)
    rec = decode_update(payload, {"w": d.shape})["w"]
    torch.testing.assert_close(rec, d, rtol=1e-4, atol=1e-4)
    assert stats.layers[0].rank == 3


def test_dense_fallback_when_factors_are_not_smaller() -> None:
    g = torch.Generator().manual_seed(3)
    d = torch.randn(4, 4, generator=g)  # full rank; r*(m+n) = 8r >= 16 for r >= 2
    payload, stats = encode_update({"w": d}, 0.98)
    assert set(payload) == {"w"}
    assert torch.equal(payload["w"], d)
    assert not stats.layers[0].factored and stats.layers[0].rank >= 2
    assert stats.encoded_bytes == stats.dense_bytes == 16 * 4
    torch.testing.assert_close(decode_update(payload, {"w": d.shape})["w"], d)


def test_one_d_params_and_int_buffers_go_dense() -> None:
    delta = {
        "bias": torch.randn(16),
        "bn.num_batches_tracked": torch.tensor(3, dtype=torch.int64),
        "bn.running_mean": torch.randn(16),
    }
    payload, stats = encode_update(delta, 0.95)
    assert set(payload) == set(delta)
    for k, v in delta.items():
        assert torch.equal(payload[k], v) and payload[k].dtype == v.dtype
    assert stats.encoded_bytes == 16 * 4 + 8 + 16 * 4


def test_zero_update_uploads_nothing_and_decodes_to_exact_zeros() -> None:
    delta = {"conv.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 20)}
    payload, stats = encode_update(delta, 0.95)
    assert payload["conv.weight::U"].shape == (8, 0)
    assert payload["conv.weight::V"].shape == (27, 0)
    assert payload_nbytes(payload) == 0 == stats.encoded_bytes
    dec = decode_update(payload, _shapes(delta))
    for k, v in delta.items():
        assert torch.equal(dec[k], v)
        assert torch.isfinite(dec[k]).all()
    assert stats.rel_error == 0.0
    assert all(layer.rank == 0 for layer in stats.layers)
    assert math.isinf(stats.compression_ratio)


def test_conv_weight_is_viewed_as_out_by_in_kh_kw_and_compresses() -> None:
    # A conv update with low rank across output channels: per-kernel-slice SVD (3x3)
    # could not compress it; the out x (in*kh*kw) view must.
    base = _low_rank(64, 32 * 9, 4, seed=4, noise=0.01)
    d = base.reshape(64, 32, 3, 3)
    payload, stats = encode_update({"conv.weight": d}, 0.95)
    assert payload["conv.weight::U"].shape[0] == 64
    assert payload["conv.weight::V"].shape[0] == 32 * 9
    assert stats.layers[0].rank <= 4
    assert stats.compression_ratio > 5
    rec = decode_update(payload, {"conv.weight": d.shape})["conv.weight"]
    assert rec.shape == d.shape
    assert float((rec - d).norm() / d.norm()) < math.sqrt(0.05) + 1e-6


@pytest.mark.parametrize("fp16", [False, True])
def test_bytes_are_counted_exactly(fp16: bool) -> None:
    delta = {
        "conv.weight": _low_rank(16, 8 * 9, 2, seed=5).reshape(16, 8, 3, 3),
        "conv.bias": torch.randn(16),
        "fc.weight": _low_rank(10, 400, 1, seed=6),
        "tiny.weight": torch.randn(2, 2),
    }
    payload, stats = encode_update(delta, 0.98, fp16_factors=fp16)
    r_conv = payload["conv.weight::U"].shape[1]
    r_fc = payload["fc.weight::U"].shape[1]
    fb = 2 if fp16 else 4
    expected = fb * r_conv * (16 + 72) + 16 * 4 + fb * r_fc * (10 + 400) + 4 * 4
    assert r_conv == 2 and r_fc == 1
    assert payload_nbytes(payload) == expected == stats.encoded_bytes
    assert stats.dense_bytes == 4 * (16 * 72 + 16 + 10 * 400 + 4)
    assert payload["conv.weight::U"].dtype == (torch.float16 if fp16 else torch.float32)
    assert payload["tiny.weight"].dtype == torch.float32  # dense fallback keeps its dtype
    dec = decode_update(payload, _shapes(delta))
    for k, v in delta.items():
        assert dec[k].dtype == torch.float32
        torch.testing.assert_close(dec[k], v, rtol=1e-2 if fp16 else 1e-4, atol=1e-2 if fp16 else 1e-4)


def test_decode_rejects_missing_and_extra_entries() -> None:
    payload, _ = encode_update({"w": torch.randn(3, 3)}, 0.95)
    with pytest.raises(KeyError, match="no dense or factored"):
        decode_update(payload, {"w": (3, 3), "v": (2,)})
    with pytest.raises(KeyError, match="not in the model"):
        decode_update({**payload, "x": torch.zeros(1)}, {"w": (3, 3)})


def test_non_finite_update_is_rejected_with_a_reason() -> None:
    with pytest.raises(ValueError, match="NaN"):
        encode_update({"w": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])}, 0.95)


def test_error_feedback_residual_identity() -> None:
    torch.manual_seed(7)
    ef = ErrorFeedback()
    shapes = {"w": torch.Size([30, 50]), "b": torch.Size([30])}
    sent_total = {k: torch.zeros(s) for k, s in shapes.items()}
    true_total = {k: torch.zeros(s) for k, s in shapes.items()}
    for t in range(4):
        delta = {"w": _low_rank(30, 50, 5, seed=10 + t, noise=0.5), "b": torch.randn(30)}
        corrected = ef.add(delta)
        payload, _ = encode_update(corrected, 0.8)
        decoded = decode_update(payload, shapes)
        ef.update(corrected, decoded)
        # residual identity: corrected == decoded + residual
        for k in shapes:
            torch.testing.assert_close(corrected[k], decoded[k] + ef.residual[k])
            sent_total[k] += decoded[k]
            true_total[k] += delta[k]
    # telescoping: everything sent + what is still held back == the sum of true updates
    for k in shapes:
        torch.testing.assert_close(sent_total[k] + ef.residual[k], true_total[k], rtol=1e-4, atol=1e-4)
    assert ef.norm() > 0.0
    restored = ErrorFeedback()
    restored.load_state_dict(ef.state_dict())
    torch.testing.assert_close(restored.residual["w"], ef.residual["w"])


def test_encoding_is_deterministic_and_does_not_alias_inputs() -> None:
    d = {"w": _low_rank(32, 48, 6, seed=8, noise=0.1), "b": torch.randn(32)}
    p1, _ = encode_update(d, 0.95)
    p2, _ = encode_update(d, 0.95)
    assert p1.keys() == p2.keys()
    for k in p1:
        assert torch.equal(p1[k], p2[k])
    p1["b"].add_(1.0)
    assert not torch.equal(p1["b"], d["b"])
