"""`python -m pref`: the `pref` command, for environments without the console script."""

from pref.cli.main import cli

cli(prog_name="pref")
