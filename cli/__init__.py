"""The `pref` command line."""
