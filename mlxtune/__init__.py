"""mlxtune: LoRA-family fine-tuning from one TOML recipe on MLX or torch+peft.

The core imports no ML framework at module level; backends live in the ``backends`` package.
"""

__version__ = "0.1.0"
