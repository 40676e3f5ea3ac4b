"""Benchmarks of mlxtune against the raw tools (see bench/README.md); not part of the installed package."""
