"""Model FLOPs per processed position (mlxtune/planning/flops.py) against hand counts."""

import json
from pathlib import Path

import pytest

from mlxtune.models.shape import ModelShape
from mlxtune.planning.flops import mfu, training_flops
from mlxtune.recipe.schema import ALL_PROJECTIONS

CFG = Path(__file__).parents[1] / "mlxtune" / "model_configs" / "smollm2-135m-instruct.json"


def smollm2() -> ModelShape:
    return ModelShape.from_config(json.loads(CFG.read_text()))


def test_smollm2_r16_all_projections_about_540_mflop():
    """Issue 18's hand count: body fwd + input-grad bwd 425, adapter 29, head on the trained half
    57, attention 21-41 (causal, padded width 256 here): about 540 MFLOP per processed position."""
    f = training_flops(smollm2(), rank=16, targets=set(ALL_PROJECTIONS), adapted_layers=30,
                       seq_len=256, trained_share=0.5)
    mf = {k: v / 1e6 for k, v in vars(f).items()}
    print({k: round(v, 1) for k, v in mf.items()}, round(f.total / 1e6, 1))
    assert mf["body"] == pytest.approx(424.7, abs=0.1)  # 4 x 30 x 3,538,944 weights
    assert mf["adapter"] == pytest.approx(29.3, abs=0.1)  # 6 x 30 x 16 x 10,176
    assert mf["head"] == pytest.approx(56.6, abs=0.1)  # 4 x 576 x 49152 x 0.5
    assert 21 <= mf["attention"] <= 41
    assert f.total / 1e6 == pytest.approx(540, rel=0.02)


def test_parts_scale_with_their_inputs():
    s = smollm2()
    full = training_flops(s, 16, {"q_proj", "v_proj"}, 30, 512, 1.0)
    # attention grows linearly with the context, nothing else moves
    half = training_flops(s, 16, {"q_proj", "v_proj"}, 30, 256, 1.0)
    assert full.attention == pytest.approx(2 * half.attention)
    assert (full.body, full.adapter, full.head) == (half.body, half.adapter, half.head)
    # the adapter term is linear in rank; the non-causal context doubles attention
    assert training_flops(s, 32, {"q_proj", "v_proj"}, 30, 512, 1.0).adapter == pytest.approx(2 * full.adapter)
    assert training_flops(s, 16, {"q_proj", "v_proj"}, 30, 512, 1.0, causal=False).attention == \
        pytest.approx(2 * full.attention)
    # fewer adapted blocks: backward stops at the lowest one (forward still runs everywhere)
    last8 = training_flops(s, 16, {"q_proj", "v_proj"}, 8, 512, 1.0)
    block = sum(i * o for i, o in s.linears().values())
    assert last8.body == pytest.approx(2 * block * 30 + 2 * block * 8)
    assert last8.adapter == pytest.approx(full.adapter * 8 / 30)
    # nothing trained: forward only
    fwd = training_flops(s, 16, set(), 30, 512, 1.0)
    assert fwd.body == pytest.approx(2 * block * 30) and fwd.adapter == 0
    with pytest.raises(ValueError, match="unknown projections"):
        training_flops(s, 16, {"c_attn"}, 30, 512, 1.0)


def test_mfu():
    assert mfu(5e8, 200.0, 1e12) == pytest.approx(0.1)
    assert mfu(5e8, 200.0, 0.0) == 0.0
