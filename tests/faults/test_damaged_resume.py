"""A run whose latest checkpoint is damaged resumes from the newest intact one; with none
intact it stops before any device work, or starts over with allow_scratch=True.

The damage kinds one by one, at the Checkpointer level: test_damaged_checkpoints.py."""
import json
import logging

import pytest

from heptapod_jax.storage import checkpoint as ckpt_lib
from heptapod_jax.training import train

import _harness as h

_FAST = {'train.peak_tflops': 1.0}  # No matmul timing at start-up.


def _truncate_array_data(step_dir):
  data = [p for p in step_dir.glob('state/**/d/*') if p.is_file()]
  assert data
  for p in data:
    with open(p, 'r+b') as f:
      f.truncate(p.stat().st_size // 2)


@pytest.mark.slow
def test_resumes_from_newest_intact_and_allow_scratch_starts_over(tmp_path, digits_dir, caplog):
  workdir = str(tmp_path / 'wd')
  checkpoints = tmp_path / 'wd' / 'checkpoints'
  train.train_and_evaluate(h.config(4, digits_dir, **_FAST), workdir)
  assert h.saved_steps(workdir) == [2, 4]
  _truncate_array_data(checkpoints / '4')

  with caplog.at_level(logging.WARNING):
    summary = train.train_and_evaluate(h.config(6, digits_dir, **_FAST), workdir)
  # Resumed at step 2, the newest intact one: only updates 3..6 ran (logged at 4 and 6).
  assert summary['step'] == 6 and [r['step'] for r in summary['history']] == [4, 6]
  assert f'{checkpoints}/4' in caplog.text and 'OUT_OF_RANGE' in caplog.text
  assert h.saved_steps(workdir) == [2, 4, 6]
  [aside] = (checkpoints / ckpt_lib.DAMAGED_DIR).iterdir()
  assert aside.name.startswith('4.') and (aside / 'state').is_dir()
  # The input position went on from step 2's: 16 images per step, none twice.
  data = json.loads((checkpoints / '6' / 'data' / 'metadata').read_text())
  assert data['per_process'][0]['position'] == 6 * 16

  for step in (2, 4, 6):
    (checkpoints / str(step) / 'state' / '_METADATA').write_text('{not json')
  with pytest.raises(ckpt_lib.NoIntactCheckpointError, match='allow_scratch=True'):
    train.train_and_evaluate(h.config(2, digits_dir, **_FAST), workdir)
  assert h.saved_steps(workdir) == [2, 4, 6]  # Nothing moved without allow_scratch.

  summary = train.train_and_evaluate(h.config(2, digits_dir, allow_scratch=True, **_FAST), workdir)
  assert summary['step'] == 2 and [r['step'] for r in summary['history']] == [2]
  assert h.saved_steps(workdir) == [2]
  assert len(list((checkpoints / ckpt_lib.DAMAGED_DIR).iterdir())) == 4
