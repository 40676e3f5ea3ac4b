"""The command layer: click commands and rich output. The only place that imports them."""
