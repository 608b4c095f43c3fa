"""Drawing images from a trained model: the decode loop, the sampler of a run, generation in
chunks, and sample mode (the command line for a few images is heptapod_jax/sample.py).

  decode.py         raster-order decoding with a functional KV cache, inside `jax.jit` (no TF)
  image_sampler.py  a run's model, tokenizer and mesh ready to draw images (`ImageSampler`)
  generation.py     class-balanced, resumable generation in chunks; samples of chosen classes
  sample_mode.py    sample mode (`main --mode=sample`): ADM's .npz and the generative metrics
"""
