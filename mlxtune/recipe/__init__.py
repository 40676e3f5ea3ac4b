"""The recipe: typed TOML sections, validation, --set overrides, the key reference."""
