"""`mlxtune chat` (issue 14) driven with piped input: turns keep their history, /base and /tuned
switch the adapter for the same history, /reset and /system work, an outgrown context drops the
oldest turns with a note; end to end: run -> export merged -> chat on the merged folder gives the
run's own reply."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mlxtune.cli.main import cli
from mlxtune.recipe.loading import load_recipe

from conftest import TINY_RECIPE_HEAD, TINY_RECORDS, write_jsonl


def chat(*args, input):
    return CliRunner().invoke(cli, ["chat", *map(str, args)], input=input)


def expected(run, backend, conversations, adapter):
    """Greedy replies (max 12 tokens) to each conversation (a list of messages ending with the user's)."""
    from mlxtune.data.records import render_segments, tokenize_segments
    from mlxtune.evaluation.generation import GenSettings, generate_texts
    from mlxtune.export.merge import adapter_folder, run_recipe
    from mlxtune.training.session import load_for_use

    recipe = run_recipe(run)
    b, tok, _ = load_for_use(recipe, backend, adapter_folder(run, None) if adapter else None)
    ids = [tokenize_segments(render_segments(c, "chat", tok, add_generation_prompt=True), tok, recipe.data).tokens
           for c in conversations]
    return generate_texts(b, tok, ids, GenSettings(max_tokens=12, batch_size=1), adapter=adapter)


def test_turns_base_tuned_reset_system(trained):
    backend, run = trained
    script = ["say hello", "count to three", "/base", "/reset", "say hello", "/tuned", "/reset", "say hello",
              "/system be brief", "/nope", "/exit", "what color is the sky"]
    res = chat(run, "--max-tokens", 12, "--backend", backend, input="\n".join(script) + "\n")
    assert res.exit_code == 0, res.output
    replies = res.stdout.split("\n")[:-1]
    assert len(replies) == 4, res.stdout  # nothing after /exit
    hello = [{"role": "user", "content": "say hello"}]
    two = hello + [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": "count to three"}]
    tuned = expected(run, backend, [hello, two], adapter=True)
    (base,) = expected(run, backend, [hello], adapter=False)
    assert replies == [tuned[0], tuned[1], base, tuned[0]]  # the second turn saw the first
    assert base != tuned[0]
    for note in ("adapter off", "history cleared", "adapter on", "system prompt set to 'be brief'", "unknown command '/nope'"):
        assert note in res.stderr


def test_system_prompt_is_rendered(tiny_tokenizer, tiny_recipe):
    from mlxtune.evaluation.chat import Chat
    from mlxtune.evaluation.generation import GenSettings

    cfg = load_recipe(tiny_recipe(), ["data.system_prompt='say yes'"]).data
    c = Chat(None, tiny_tokenizer, cfg, GenSettings(), 512, "test", has_adapter=False)
    c.messages = [{"role": "user", "content": "hello"}]
    assert tiny_tokenizer.decode(c.prompt_ids()).startswith("<|system|> say yes </s> <|user|> hello")
    assert "no adapter" in c.command("/base") and not c.tuned
    c.command("/system   say no ")
    assert tiny_tokenizer.decode(c.prompt_ids()).startswith("<|system|> say no </s> <|user|> hello")
    c.command("/system")
    assert tiny_tokenizer.decode(c.prompt_ids()).startswith("<|user|> hello")


def test_outgrown_context_drops_oldest_turns(trained):
    backend, run = trained
    # data.max_seq_len = 64 < the model's 512 positions: 56 new tokens leave 8 for the prompt, one
    # turn of "count to three" (6 tokens) fits, two do not; 20 words never fit
    script = ["count to three", "count to three", "count " * 20, "say hello"]
    res = chat(run, "--max-tokens", 56, "--backend", backend, input="\n".join(script) + "\n")
    assert res.exit_code == 0, res.output
    assert "context 64 tokens (the run's data.max_seq_len = 64)" in res.stderr
    assert "dropped the oldest 1 turn(s)" in res.stderr
    assert "does not fit the context of 64 tokens" in res.stderr and "shorter message" in res.stderr
    assert len(res.stdout.split("\n")[:-1]) == 3  # the too-long message got no reply, the chat went on
    res = chat(run, "--max-tokens", 64, "--backend", backend, input="hi\n")
    assert res.exit_code == 2 and "--max-tokens 64: leaves no room" in res.stderr


@pytest.mark.slow
def test_run_export_merged_chat_end_to_end(tmp_path, embedded_model_dir):
    write_jsonl(tmp_path / "train.jsonl", TINY_RECORDS)
    head = TINY_RECIPE_HEAD.format(model="embedded:smollm2-135m-instruct").replace("max_seq_len = 64", "max_seq_len = 128")
    (tmp_path / "recipe.toml").write_text(head + f'\n[train]\nsteps = 2\nmicro_batch = 2\ngrad_accum = 1\nlr = 1e-3\n'
                                          f'\n[eval]\nbefore = false\n\n[output]\ndir = "{tmp_path / "runs"}"\nname = "e2e"\n')
    invoke = CliRunner().invoke
    res = invoke(cli, ["run", str(tmp_path / "recipe.toml"), "--backend", "torch", "--no-progress"])
    assert res.exit_code == 0, res.output
    run, out = tmp_path / "runs" / "e2e", tmp_path / "merged"
    res = invoke(cli, ["export", str(run), str(out), "--format", "merged", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    merged = chat(out, "--max-tokens", 16, "--backend", "torch", input="hello\n/tuned\n/exit\n")
    assert merged.exit_code == 0, merged.output
    assert merged.stdout.strip() and "no adapter" in merged.stderr
    own = chat(run, "--max-tokens", 16, "--backend", "torch", input="hello\n/exit\n")
    assert own.exit_code == 0, own.output
    assert own.stdout == merged.stdout  # the merge is exact in fp32
    print(f"\ne2e chat reply: {merged.stdout.strip()!r}")
