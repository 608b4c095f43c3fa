"""Where files go: the path layer (`paths.py`) that every file of the project passes through."""
