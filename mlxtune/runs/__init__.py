"""Run directories: their files (the one place they are read and written), the report, plots, and comparing runs."""
