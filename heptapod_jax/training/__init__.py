"""Training: the trainers, their pure steps and optimizer, and the multi-process watchdog.

  train.py            the AR model's training loop (config.trainer='ar')
  train_tokenizer.py  the VQ/KL tokenizers' training loop (config.trainer='tokenizer')
  trainlib.py         pieces shared by both trainers
  steps.py            the AR model's pure, jitted steps and train state (no TF, no clu)
  optim.py            AdamW, schedules, clipping, decay mask, EMA
  liveness.py         a dead peer process ends the job cleanly, with a last word
"""
