"""A PyTorch reference of MAR's KL VAE (models/vae.py, LDM's AutoencoderKL), NCHW.

Same modules, names and operations as the original so that `state_dict()` has
the keys of `kl16.ckpt['model']`. The ResNet/attention/resampling blocks are
identical to LlamaGen's and are shared with `llamagen_vq`; LDM's blocks take a
(here always None) time embedding, which changes no parameter.
"""
from __future__ import annotations

import torch
from torch import nn

from .llamagen_vq import AttnBlock, Downsample, ResnetBlock, Upsample, group_norm, swish


class Encoder(nn.Module):

  def __init__(self, *, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
               dropout=0.0, in_channels=3, resolution=256, z_channels=16, double_z=True):
    super().__init__()
    self.num_resolutions = len(ch_mult)
    self.num_res_blocks = num_res_blocks
    self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
    curr_res = resolution
    in_ch_mult = (1,) + tuple(ch_mult)
    self.down = nn.ModuleList()
    for i_level in range(self.num_resolutions):
      block, attn = nn.ModuleList(), nn.ModuleList()
      block_in = ch * in_ch_mult[i_level]
      block_out = ch * ch_mult[i_level]
      for _ in range(num_res_blocks):
        block.append(ResnetBlock(block_in, block_out, dropout))
        block_in = block_out
        if curr_res in attn_resolutions:
          attn.append(AttnBlock(block_in))
      down = nn.Module()
      down.block, down.attn = block, attn
      if i_level != self.num_resolutions - 1:
        down.downsample = Downsample(block_in)
        curr_res //= 2
      self.down.append(down)
    self.mid = nn.Module()
    self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
    self.mid.attn_1 = AttnBlock(block_in)
    self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
    self.norm_out = group_norm(block_in)
    self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)

  def forward(self, x):
    h = self.conv_in(x)
    for i_level in range(self.num_resolutions):
      for i in range(self.num_res_blocks):
        h = self.down[i_level].block[i](h)
        if len(self.down[i_level].attn) > 0:
          h = self.down[i_level].attn[i](h)
      if i_level != self.num_resolutions - 1:
        h = self.down[i_level].downsample(h)
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
    return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):

  def __init__(self, *, ch=128, out_ch=3, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
               attn_resolutions=(), dropout=0.0, resolution=256, z_channels=16):
    super().__init__()
    self.num_resolutions = len(ch_mult)
    self.num_res_blocks = num_res_blocks
    block_in = ch * ch_mult[-1]
    curr_res = resolution // 2 ** (self.num_resolutions - 1)
    self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
    self.mid = nn.Module()
    self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
    self.mid.attn_1 = AttnBlock(block_in)
    self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
    self.up = nn.ModuleList()
    for i_level in reversed(range(self.num_resolutions)):
      block, attn = nn.ModuleList(), nn.ModuleList()
      block_out = ch * ch_mult[i_level]
      for _ in range(num_res_blocks + 1):
        block.append(ResnetBlock(block_in, block_out, dropout))
        block_in = block_out
        if curr_res in attn_resolutions:
          attn.append(AttnBlock(block_in))
      up = nn.Module()
      up.block, up.attn = block, attn
      if i_level != 0:
        up.upsample = Upsample(block_in)
        curr_res *= 2
      self.up.insert(0, up)  # LDM: indexed by level, 0 = full resolution.
    self.norm_out = group_norm(block_in)
    self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

  def forward(self, z):
    h = self.conv_in(z)
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
    for i_level in reversed(range(self.num_resolutions)):
      for i in range(self.num_res_blocks + 1):
        h = self.up[i_level].block[i](h)
        if len(self.up[i_level].attn) > 0:
          h = self.up[i_level].attn[i](h)
      if i_level != 0:
        h = self.up[i_level].upsample(h)
    return self.conv_out(swish(self.norm_out(h)))


class AutoencoderKL(nn.Module):
  """MAR's AutoencoderKL(embed_dim, ch_mult) with use_variational=True; LDM's fixed resolution=256.

  `resolution` and `ch` are exposed so tests can build small models with the
  same structure (attention where the nominal resolution is 16).
  """

  def __init__(self, embed_dim=16, ch_mult=(1, 1, 2, 2, 4), ch=128, num_res_blocks=2, resolution=256):
    super().__init__()
    self.encoder = Encoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                           resolution=resolution, z_channels=embed_dim)
    self.decoder = Decoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                           resolution=resolution, z_channels=embed_dim)
    self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
    self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)

  def encode(self, x):
    """-> (mean, logvar) with LDM's DiagonalGaussianDistribution clamp of logvar to [-30, 20]."""
    moments = self.quant_conv(self.encoder(x))
    mean, logvar = torch.chunk(moments, 2, dim=1)
    return mean, torch.clamp(logvar, -30.0, 20.0)

  def decode(self, z):
    return self.decoder(self.post_quant_conv(z))
