"""The README describes the code as it is: commands, recipe keys, and the CI's test command."""

from pathlib import Path

from mlxtune.cli.main import cli
from mlxtune.recipe.loading import reference_markdown

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
TEST_COMMAND = "bash scripts/install.sh dev && python -m pytest -q"
MAIN_COMMAND = "bash scripts/install.sh && mlxtune run recipes/quickstart.toml"


def test_readme_recipe_reference_is_generated():
    assert reference_markdown() in README, "README's recipe reference is stale: paste `mlxtune keys --markdown`"


def test_readme_lists_every_command():
    def names(group, prefix):
        for name, cmd in group.commands.items():
            yield from names(cmd, f"{prefix} {name}") if hasattr(cmd, "commands") else [f"{prefix} {name}"]

    for name in names(cli, "mlxtune"):
        assert f"`{name}" in README, name


def test_readme_commands_and_ci_agree():
    assert f"\n{MAIN_COMMAND}\n" in README and f"\n{TEST_COMMAND}\n" in README
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text()
