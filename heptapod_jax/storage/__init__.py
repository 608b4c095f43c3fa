"""Where files go, and what the project writes and reads back: the path layer (`paths.py`) that
every file of the project passes through, and the formats on top of it.

  paths.py                 the path layer: local paths and gs:// buckets alike
  artifacts.py             npz files read back checked (CRC-32 per member), named when damaged
  checkpoint.py            checkpoints: a thin wrapper around Orbax's CheckpointManager
  checkpoint_read.py       parameters out of a run's checkpoints, read-only
  tokenizer_checkpoint.py  tokenizer checkpoints: the format, and the tokenizer built from one
  runs.py                  trained runs on disk, loaded for sampling
"""
