"""Evaluation metrics. `recon`: PSNR, SSIM and codebook usage / perplexity for tokenizers."""
from heptapod_jax.evaluators.recon import codebook_usage, psnr, ssim

__all__ = ['codebook_usage', 'psnr', 'ssim']
