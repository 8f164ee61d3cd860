"""Model counting against hand-derived numbers; presets against their published sizes; strict files."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import moeplan as mp
from moeplan import moe as M

SMALL = dict(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_head=16, vocab_size=1000, seq_len=128, d_ff=256,
             num_experts=8, top_k=2, expert_d_ff=96, moe_every=2, capacity_factor=1.25)


def test_flops_of_a_small_model_equal_a_hand_count():
    m = mp.MoEModel(**SMALL)
    assert m.n_moe_layers == 2 and m.n_dense_layers == 2  # blocks 1 and 3 are MoE
    attn = 64 * 16 * (2 * 4 + 2 * 2)  # q, o: 64x64; k, v: 64x32 each = 12288
    assert M.attention_params(m) == attn == 12288
    f = M.forward_flops_per_token(m)
    assert f["attention_proj"] == 2 * 12288 * 4
    assert f["attention_scores"] == 4 * 128 * 4 * 16 * 4  # 4 s h dh per layer, 4 layers
    assert f["dense_ffn"] == 2 * 3 * 64 * 256 * 2  # gated: 3 matrices, 2 dense layers
    assert f["router"] == 2 * 64 * 8 * 2
    assert f["experts"] == 2 * 2 * 3 * 64 * 96 * 2  # top-2 of 3 x 64 x 96, 2 MoE layers
    assert f["logits"] == 2 * 1000 * 64
    assert M.model_flops_per_token(m) == 3 * sum(f.values())
    counts = M.param_counts(m)
    experts = 2 * 8 * 3 * 64 * 96
    assert counts["expert"] == experts
    assert counts["total"] == counts["non_expert"] + experts
    assert counts["active"] - counts["non_expert"] == 2 * 2 * 3 * 64 * 96


def test_moe_every_two_halves_the_moe_layers():
    every = mp.MoEModel(**{**SMALL, "n_layers": 12, "moe_every": 1})
    half = every.with_(moe_every=2)
    assert every.n_moe_layers == 12 and half.n_moe_layers == 6
    assert mp.MoEModel(**{**SMALL, "n_layers": 12, "moe_every": 4}).n_moe_layers == 3
    dense_first = mp.MoEModel(**{**SMALL, "n_layers": 12, "moe_every": 1, "first_dense_layers": 3})
    assert dense_first.n_moe_layers == 9 and not dense_first.is_moe_layer[:3].any()


def test_encoder_decoder_counts_cross_attention():
    m = mp.load_model("switch-base-128")
    assert m.n_cross_attention_layers == 12 and m.n_moe_layers == 12
    assert mp.param_counts(m)["total"] == pytest.approx(7.4e9, rel=0.05)  # Switch-Base-128: 7.4B


@pytest.mark.parametrize(
    "name,total,active",
    [("deepseek-v3", 671e9, 37e9), ("mixtral-8x7b", 46.7e9, 12.9e9), ("mixtral-8x22b", 141e9, 39e9),
     ("qwen3-30b-a3b", 30.5e9, 3.3e9), ("st-moe-32b", 269e9, None), ("gpt-oss-120b", 116.8e9, None)],
)
def test_presets_match_their_published_sizes(name, total, active):
    """Published totals: DeepSeek-V3 report, Mistral AI model cards, Qwen3 report, ST-MoE paper, gpt-oss model
    card (116.8B; its 5.1B active leave out the embeddings, which the count here keeps) (5%)."""
    counts = mp.param_counts(mp.load_model(name))
    assert counts["total"] == pytest.approx(total, rel=0.05)
    if active:
        assert counts["active"] == pytest.approx(active, rel=0.05)


def test_capacity_is_the_ceiling():
    m = mp.MoEModel(**SMALL)
    assert float(M.capacity(100, m)) == 32  # ceil(100 * 2 * 1.25 / 8) = ceil(31.25)
    assert float(M.capacity(96, m)) == 30
    assert M.expert_capacity(100, 2, 1.25, 8) == 32 and isinstance(M.expert_capacity(100, 2, 1.25, 8), int)
    assert M.expert_capacity(np.array([100, 96]), 2, 1.25, 8).tolist() == [32.0, 30.0]


def test_dropless_has_one_owner_and_its_encodings_round_trip():
    """None (a model), NaN (a grid's array), 0.0 (a sort key) and 0 (an integer row code) all mean dropless."""
    cfs = [None, 1.0, 1.25, 2.0]
    array = M.capacity_array(cfs)
    assert np.isnan(array[0]) and array[1:].tolist() == [1.0, 1.25, 2.0]
    assert M.is_dropless(None) and M.is_dropless(math.nan) and not M.is_dropless(1.25)
    assert M.is_dropless(array).tolist() == [True, False, False, False]
    assert M.capacity_key(array).tolist() == [M.DROPLESS_KEY, 1.0, 1.25, 2.0] == sorted(map(M.capacity_key, cfs))
    codes = M.capacity_code(array)
    assert codes.dtype.kind == "i" and codes.tolist() == [0, 1_000_001, 1_250_001, 2_000_001]
    assert [M.capacity_of_code(c) for c in codes.tolist()] == cfs
    assert [M.capacity_code(c) for c in cfs] == codes.tolist()


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(top_k=9), "top_k"),
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(attention="linear"), "attention"),
        (dict(d_model=0), "d_model"),
        (dict(d_ff=0), "d_ff"),
        (dict(attention="mla"), "mla"),
        (dict(encoder_decoder=True, n_layers=5), "even"),
        (dict(full_attention_every=2), "full_attention_every"),
        (dict(sliding_window=-1), "sliding_window"),
        (dict(sliding_window=64, encoder_decoder=True, n_layers=4), "sliding_window"),
    ],
)
def test_bad_models_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        mp.MoEModel(**{**SMALL, **change})


def test_model_files_are_strict(tmp_path):
    good = tmp_path / "m.yaml"
    good.write_text("\n".join(f"{k}: {v}" for k, v in SMALL.items()))
    assert mp.load_model(str(good)).num_experts == 8
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text() + "\nexperts: 9\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['experts'\]"):
        mp.load_model(str(bad))
    with pytest.raises(ValueError, match="model: .* bundled"):
        mp.load_model("../../etc/passwd")


def test_a_sliding_window_counts_the_keys_each_query_attends_by_brute_force():
    """``attended_keys`` against a loop over positions and layers: a causal query at position i (1-based) sees i
    keys on a full layer and min(i, W) on a windowed one; gpt-oss alternates (W = 128, one full layer in two).
    The model FLOPs count W keys per query on windowed layers; with no window nothing changes."""
    s, w = 4096, 128
    model = mp.MoEModel(**{**SMALL, "seq_len": s, "n_layers": 6, "sliding_window": w, "full_attention_every": 3})
    layers = [i % 3 != 2 for i in range(6)]  # windowed, windowed, full
    causal = sum(sum(min(i, w) if win else i for i in range(1, s + 1)) / s for win in layers) / 6
    assert M.attended_keys(model, s, causal=True) == pytest.approx(causal, rel=2e-3)  # continuous vs discrete
    assert M.attended_keys(model, s) == pytest.approx((4 * w + 2 * s) / 6)
    assert M.attended_keys(model, 100) == pytest.approx(100)  # a context within the window: all of it
    assert M.attended_keys(dataclasses.replace(model, full_attention_every=0), s) == pytest.approx(w)
    plain = dataclasses.replace(model, sliding_window=0, full_attention_every=0)
    assert M.attended_keys(plain, s, causal=True) == pytest.approx(s / 2) and M.windowed_fraction(plain) == 0.0
    scores = M.attention_score_flops(model) * model.n_layers
    fewer = sum(M.forward_flops_per_token(plain).values()) - sum(M.forward_flops_per_token(model).values())
    assert fewer == pytest.approx(scores * (1.0 - M.attended_keys(model, s) / s))
    assert M.forward_flops_per_token(plain)["attention_scores"] == pytest.approx(scores)
