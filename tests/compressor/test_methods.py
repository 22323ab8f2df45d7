"""The methods on single matrices: ImPart's unbiasedness and budget, LowRank = truncated SVD, DARE's
kept fraction, the randomised SVD against the full one, regenerated masks, quantisation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from compressor.codec import decode_dense, decode_factors
from compressor.masks import keep_mask
from compressor.methods import MethodParams, encode_dare, encode_impart, encode_lowrank
from compressor.qt import encode_dare_qt, encode_impart_qt
from compressor.quantize import dequantize, pack, quantize, unpack
from compressor.summary import ideal_bytes
from compressor.svd import top_svd


def lowrank_plus_noise(out: int, inp: int, rank: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -1.5, rank)
    low = (torch.randn(out, rank, generator=g) * scales) @ torch.randn(rank, inp, generator=g)
    return (low + 0.05 * torch.randn(out, inp, generator=g)) / inp**0.5


def test_masks_drop_exact_counts_and_regenerate_from_the_key() -> None:
    drops = [0, 3, 10, 63]
    a, b, c = keep_mask(7, 64, drops), keep_mask(7, 64, drops), keep_mask(8, 64, drops)
    assert a.shape == (64, 4) and torch.equal(a, b) and not torch.equal(a, c)
    assert (64 - a.sum(0)).tolist() == drops


def test_masks_do_not_depend_on_how_they_are_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    import compressor.masks

    drops = list(range(0, 290, 7)) * 3
    whole = keep_mask(11, 300, drops)
    monkeypatch.setattr(compressor.masks, "CHUNK_KEYS", 1000)
    assert torch.equal(keep_mask(11, 300, drops), whole)


def test_impart_is_unbiased_over_seeds() -> None:
    """E[u_hat diag(s) v_hat^T] = the kept vectors' sum: averaging many seeds approaches it."""
    delta = lowrank_plus_noise(48, 40)
    params = MethodParams(ratio=6.0, beta=0.5, c=0.5)
    first = encode_impart("w", delta, params)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = first.rank
    target = (u[:, :k] * s[:k]) @ vh[:k]
    runs = [decode_dense(encode_impart("w", delta, replace(params, seed=i))) for i in range(300)]
    single = float((runs[0] - target).norm() / target.norm())
    mean = float((torch.stack(runs).mean(0) - target).norm() / target.norm())
    assert max(first.tensors["u_drops"].tolist()) > 0, "the test needs actual drops"
    assert mean < single / 5, (mean, single)


def test_impart_meets_the_budget_on_a_real_svd_and_keeps_p1_dense() -> None:
    for shape in [(96, 96), (32, 96), (160, 64)]:
        code = encode_impart("w", lowrank_plus_noise(*shape), MethodParams(ratio=8.0))
        assert abs(code.kept - shape[0] * shape[1] / 8) <= max(1, 0.001 * shape[0] * shape[1] / 8)
        assert code.tensors["u_drops"][0] == 0 and code.tensors["v_drops"][0] == 0


def test_lowrank_equals_truncated_svd() -> None:
    delta = lowrank_plus_noise(64, 96)
    code = encode_lowrank("w", delta, MethodParams(ratio=8.0))
    k = 64 * 96 // 8 // (64 + 96)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    assert code.rank == k
    torch.testing.assert_close(decode_dense(code), (u[:, :k] * s[:k]) @ vh[:k], atol=2e-4, rtol=1e-3)


def test_dare_keeps_the_expected_fraction_and_rescales() -> None:
    delta = lowrank_plus_noise(64, 100)
    code = encode_dare("w", delta, MethodParams(ratio=10.0))
    rec = decode_dense(code)
    kept = rec != 0
    assert int(kept.sum()) == 640
    assert kept.sum(1).max() - kept.sum(1).min() <= 1, "drops spread evenly over rows"
    torch.testing.assert_close(rec[kept], (delta * 10.0)[kept], rtol=2e-3, atol=1e-5)
    u, s, v = decode_factors(code)
    assert torch.equal(u, rec) and torch.equal(s, torch.ones(100)) and torch.equal(v, torch.eye(100))


def test_randomised_svd_matches_the_full_svd_on_the_kept_vectors() -> None:
    delta = lowrank_plus_noise(600, 300, rank=40)
    u1, s1, v1 = top_svd(delta, 30, "full")
    u2, s2, v2 = top_svd(delta, 30, "lowrank")
    torch.testing.assert_close(s2, s1, rtol=2e-2, atol=0)
    full, fast = (u1 * s1) @ v1.t(), (u2 * s2) @ v2.t()
    assert float((full - fast).norm() / full.norm()) < 0.05


def test_quantisation_round_trips_codes_bit_exactly() -> None:
    x = torch.randn(300)
    streams = []
    for bits in (2, 3, 8):
        codes, params = quantize(x, bits)
        assert codes.max() < 2**bits
        err = float((dequantize(codes, params) - x).abs().max())
        assert err <= float(params[:, 1].float().max()) * 0.5 + 1e-3
        streams.append((codes, bits))
    packed = pack(streams)
    assert packed.numel() == (300 * 13 + 7) // 8
    for (codes, _), back in zip(streams, unpack(packed, [(300, 2), (300, 3), (300, 8)])):
        assert np.array_equal(codes, back)


@pytest.mark.parametrize(("encode", "plain"), [(encode_impart_qt, encode_impart), (encode_dare_qt, encode_dare)])
def test_quantised_methods_meet_the_byte_budget_and_beat_16_bit_values(encode: object, plain: object) -> None:
    """At the same bytes, quantised values let more of them be kept: the error must drop."""
    delta = lowrank_plus_noise(256, 256)
    code, reference = encode("w", delta, MethodParams(ratio=16.0)), plain("w", delta, MethodParams(ratio=16.0))
    dense_bytes = 256 * 256 * 2
    assert dense_bytes / ideal_bytes(code) == pytest.approx(16.0, rel=0.05)
    assert code.kept > 2 * reference.kept
    err = float((decode_dense(code) - delta).norm() / delta.norm())
    err_plain = float((decode_dense(reference) - delta).norm() / delta.norm())
    assert err < err_plain, (err, err_plain)


def test_search_keeps_the_best_scored_grid_point(pair: tuple, tmp_path) -> None:
    """The validation callback decides: here it prefers the artifact closest to the true delta
    on one layer, and the written artifact must be that grid point's."""
    import compressor
    from compressor.checkpoint import Checkpoint
    from compressor.search import search

    base, ft = pair
    name = "model.layers.0.mlp.up_proj.weight"
    delta = Checkpoint(ft).tensor(name) - Checkpoint(base).tensor(name)

    def validate(path) -> float:
        return -float((compressor.load_artifact(path).module(name).dense() - delta).norm())

    grid = ((0.8, 0.5), (0.5, 1.0), (0.9, 0.1))
    result = search(base, ft, tmp_path / "best.safetensors", validate, ratio=4.0, grid=grid)
    assert set(result.scores) == set(grid)
    assert result.best == max(result.scores, key=result.scores.get)
    assert len(set(result.scores.values())) > 1, "grid points must give different artifacts"
    written = compressor.load_artifact(tmp_path / "best.safetensors")
    assert (written.manifest["params"]["beta"], written.manifest["params"]["c"]) == result.best
    assert validate(tmp_path / "best.safetensors") == pytest.approx(result.scores[result.best])


def test_gptq_lowers_the_output_error_of_the_quantised_v_factor() -> None:
    """GPTQ on V must beat round-to-nearest on the layer's outputs ||(D - D_hat) x|| for inputs
    with the correlated, uneven scales real activations have, and decode through the same layout."""
    from compressor.qt import impart_qt_code
    from compressor.svd import top_svd as svd_of

    g = torch.Generator().manual_seed(3)
    delta = lowrank_plus_noise(96, 256, rank=8)
    x = torch.randn(512, 32, generator=g) @ torch.randn(32, 256, generator=g) * torch.logspace(0, 1, 256)
    params = MethodParams(ratio=16.0)
    svd = svd_of(delta, 64, "full")
    rtn = impart_qt_code("w", (96, 256), svd, params)
    gptq = impart_qt_code("w", (96, 256), svd, params, inputs=x)
    assert gptq.meta["quantiser"] == "gptq-v" and gptq.kept == rtn.kept
    assert torch.equal(gptq.tensors["u"], rtn.tensors["u"]), "U stays round-to-nearest"
    out_err = {name: float(((decode_dense(c) - delta) @ x.t()).norm()) for name, c in (("rtn", rtn), ("gptq", gptq))}
    assert out_err["gptq"] < 0.95 * out_err["rtn"], out_err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_svd_on_the_gpu_matches_the_cpu() -> None:
    delta = lowrank_plus_noise(600, 300, rank=40)
    for mode in ("full", "lowrank"):
        u1, s1, v1 = top_svd(delta, 30, mode, "cpu")
        u2, s2, v2 = top_svd(delta, 30, mode, "cuda")
        assert u2.device.type == "cpu" and u2.dtype == torch.float32
        torch.testing.assert_close(s2, s1, rtol=2e-2, atol=0)
        torch.testing.assert_close((u2 * s2) @ v2.t(), (u1 * s1) @ v1.t(), rtol=0.05, atol=2e-3)


def test_dare_above_the_row_length_keeps_whole_rows_out_instead_of_failing() -> None:
    # 4 x 8 = 32 entries at CR 64: the budget rounds to (at most) one kept entry, so most rows keep none.
    from compressor.methods import MethodParams, encode_dare

    delta = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    code = encode_dare("w", delta, MethodParams(ratio=64.0, seed=0))
    values = code.tensors["d"]
    assert values.numel() <= 1 and torch.isfinite(values.float()).all()


def test_method_parameters_are_checked_against_their_field_types() -> None:
    """compress()'s keyword arguments reach MethodParams only when each fits its field's type."""
    from compressor.pipeline import method_params_of

    params = method_params_of(8, 1, {"beta": 1, "svd": "full", "embedding_ratio": None, "bits": np.int64(3)})
    assert (params.ratio, params.seed, params.beta, params.svd, params.bits) == (8.0, 1, 1, "full", 3)
    for bad in ({"svd": "exact"}, {"bits": 2.5}, {"device": None}, {"beta": "0.8"}):
        with pytest.raises(TypeError, match=f"method parameter {next(iter(bad))} must be"):
            method_params_of(8, 0, bad)
    with pytest.raises(ValueError, match="unknown method parameter"):
        method_params_of(8, 0, {"gamma": 1.0})
