"""What users run: the `gss` command line."""
