"""Data files that ship inside the lmtune package (see README.md in this folder)."""
