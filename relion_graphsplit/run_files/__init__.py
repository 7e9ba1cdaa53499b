"""The output folder of a run: its lock, staging and commit (folder), and the files written in it (write)."""
