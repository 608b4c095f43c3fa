"""PyTorch re-implementations of the public tokenizers, used only as references in tests.

They reproduce the module and parameter names of LlamaGen's VQ model and MAR's
KL VAE so that their state dicts match the released checkpoints key for key.
Importing this package imports torch.
"""
