"""Click arguments and options that several commands share, declared once."""

from __future__ import annotations

import click

from mlxtune.recipe.loading import SET_HELP
from mlxtune.training.backend_choice import BACKEND_CHOICES

OVERRIDE_BACKEND = "Override the recipe's backend."

recipe_argument = click.argument("recipe", type=click.Path(dir_okay=False))
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)


def backend_option(help: str = OVERRIDE_BACKEND):
    """``--backend auto|mlx|torch`` (None when not given: the recipe's)."""
    return click.option("--backend", type=click.Choice(list(BACKEND_CHOICES)), default=None, help=help)


def no_progress_option(help: str):
    return click.option("--no-progress", is_flag=True, help=help)
