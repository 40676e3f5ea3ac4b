"""train.autocast = "bfloat16" on torch: the blocks' frozen linear weights stored in bf16 (issue 18),
everything trainable, the embeddings, norms and head in float32; training, eval, generation and the
saved adapter as before."""

import numpy as np
import pytest

from mlxtune.recipe.loading import load_recipe

torch = pytest.importorskip("torch")

from test_bench import _train  # noqa: E402  (3 torch steps of a recipe on the tiny model)


def _backend(recipe_path, overrides):
    """3 steps at lr 1e-2 (test_bench's), then the eval split's summed loss."""
    from mlxtune.data.batching import eval_batches
    from mlxtune.models.source import pad_id
    from mlxtune.training.session import prepare

    backend, losses = _train(recipe_path, overrides)
    _, tok, data = prepare(load_recipe(recipe_path, overrides))
    ev = [backend.eval_step(b.tokens, {"loss": b.mask}) for b in eval_batches(data.eval, 4, pad_id(tok))]
    return backend, losses, sum(e["loss"] for e in ev)


def _dtypes(model):
    out = {}
    for name, p in model.named_parameters():
        kind = ("trainable" if p.requires_grad else "base_linear" if ".base_layer." in name or "_proj." in name
                else "head" if "lm_head" in name else "other")
        out.setdefault(kind, set()).add(p.dtype)
    return out


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_bf16_autocast_stores_frozen_block_linears_in_bf16(tiny_recipe, tmp_path, method):
    path = tiny_recipe()
    over = [f'adapter.method="{method}"']
    fp32, loss32, ev32 = _backend(path, over)
    bf16, loss16, ev16 = _backend(path, over + ['train.autocast="bfloat16"'])
    assert _dtypes(fp32.model) == {"trainable": {torch.float32}, "base_linear": {torch.float32},
                                   "head": {torch.float32}, "other": {torch.float32}}
    d = _dtypes(bf16.model)
    assert d["base_linear"] == {torch.bfloat16}
    assert d["trainable"] == d["head"] == d["other"] == {torch.float32}  # adapter, embeddings, norms
    assert all(np.isfinite(loss16)) and loss16 != loss32
    assert np.allclose(loss16, loss32, rtol=0.03) and ev16 == pytest.approx(ev32, rel=0.03)
    # the optimizer state follows the float32 adapter
    assert all(s.dtype == torch.float32 for st in bf16.optimizer.state.values() for s in st.values() if s.dim() > 0)
    # generation runs (under autocast) and is greedy-deterministic
    prompt = [np.array([1, 5, 7, 9], dtype=np.int64)]
    out = bf16.generate(prompt, 4)
    assert len(out[0]) == 4 and out == bf16.generate(prompt, 4)
    # the saved adapter is float32 and loads back
    from safetensors.numpy import load_file

    bf16.save_adapter(tmp_path / "a")
    (f,) = (tmp_path / "a").glob("*.safetensors")
    assert {v.dtype for v in load_file(f).values()} == {np.dtype("float32")}
    bf16.load_adapter(tmp_path / "a")
