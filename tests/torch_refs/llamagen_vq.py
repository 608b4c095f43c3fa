"""A PyTorch reference of LlamaGen's VQ model (tokenizer/tokenizer_image/vq_model.py), NCHW.

Written for the tests: same modules, parameter/buffer names and operations as
the original (GroupNorm(32, eps=1e-6), swish, (0, 1, 0, 1)-padded stride-2
downsampling conv, nearest x2 upsampling, single-head 1x1-conv attention,
l2-normalised codebook search), so that `state_dict()` has the keys of
`vq_ds16_c2i.pt['model']`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swish(x: torch.Tensor) -> torch.Tensor:
  return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):

  def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
    super().__init__()
    self.in_channels, self.out_channels = in_channels, out_channels
    self.norm1 = group_norm(in_channels)
    self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
    self.norm2 = group_norm(out_channels)
    self.dropout = nn.Dropout(dropout)
    self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
    if in_channels != out_channels:
      self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

  def forward(self, x):
    h = self.conv1(swish(self.norm1(x)))
    h = self.conv2(self.dropout(swish(self.norm2(h))))
    if self.in_channels != self.out_channels:
      x = self.nin_shortcut(x)
    return x + h


class AttnBlock(nn.Module):

  def __init__(self, channels: int):
    super().__init__()
    self.norm = group_norm(channels)
    self.q = nn.Conv2d(channels, channels, 1)
    self.k = nn.Conv2d(channels, channels, 1)
    self.v = nn.Conv2d(channels, channels, 1)
    self.proj_out = nn.Conv2d(channels, channels, 1)

  def forward(self, x):
    h = self.norm(x)
    q, k, v = self.q(h), self.k(h), self.v(h)
    b, c, hh, ww = q.shape
    q = q.reshape(b, c, hh * ww).permute(0, 2, 1)  # b, hw, c
    k = k.reshape(b, c, hh * ww)  # b, c, hw
    w = torch.softmax(torch.bmm(q, k) * (int(c) ** -0.5), dim=2)  # b, hw(q), hw(k)
    v = v.reshape(b, c, hh * ww)
    out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + self.proj_out(out)


class Downsample(nn.Module):

  def __init__(self, channels: int):
    super().__init__()
    self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1), mode='constant', value=0))


class Upsample(nn.Module):

  def __init__(self, channels: int):
    super().__init__()
    self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


class Encoder(nn.Module):

  def __init__(self, in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, dropout=0.0,
               z_channels=256):
    super().__init__()
    self.num_resolutions = len(ch_mult)
    self.num_res_blocks = num_res_blocks
    self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
    in_ch_mult = (1,) + tuple(ch_mult)
    self.conv_blocks = nn.ModuleList()
    block_in = ch
    for i_level in range(self.num_resolutions):
      conv_block = nn.Module()
      res, attn = nn.ModuleList(), nn.ModuleList()
      block_in = ch * in_ch_mult[i_level]
      block_out = ch * ch_mult[i_level]
      for _ in range(num_res_blocks):
        res.append(ResnetBlock(block_in, block_out, dropout))
        block_in = block_out
        if i_level == self.num_resolutions - 1:
          attn.append(AttnBlock(block_in))
      conv_block.res, conv_block.attn = res, attn
      if i_level != self.num_resolutions - 1:
        conv_block.downsample = Downsample(block_in)
      self.conv_blocks.append(conv_block)
    self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in),
                              ResnetBlock(block_in, block_in, dropout)])
    self.norm_out = group_norm(block_in)
    self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

  def forward(self, x):
    h = self.conv_in(x)
    for i_level, block in enumerate(self.conv_blocks):
      for i in range(self.num_res_blocks):
        h = block.res[i](h)
        if len(block.attn) > 0:
          h = block.attn[i](h)
      if i_level != self.num_resolutions - 1:
        h = block.downsample(h)
    for m in self.mid:
      h = m(h)
    return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
  """`num_res_blocks` as in LlamaGen: each level builds num_res_blocks + 1 ResNet blocks."""

  def __init__(self, z_channels=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, dropout=0.0,
               out_channels=3):
    super().__init__()
    self.num_resolutions = len(ch_mult)
    self.num_res_blocks = num_res_blocks
    block_in = ch * ch_mult[-1]
    self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
    self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in),
                              ResnetBlock(block_in, block_in, dropout)])
    self.conv_blocks = nn.ModuleList()
    for i_level in reversed(range(self.num_resolutions)):
      conv_block = nn.Module()
      res, attn = nn.ModuleList(), nn.ModuleList()
      block_out = ch * ch_mult[i_level]
      for _ in range(num_res_blocks + 1):
        res.append(ResnetBlock(block_in, block_out, dropout))
        block_in = block_out
        if i_level == self.num_resolutions - 1:
          attn.append(AttnBlock(block_in))
      conv_block.res, conv_block.attn = res, attn
      if i_level != 0:
        conv_block.upsample = Upsample(block_in)
      self.conv_blocks.append(conv_block)
    self.norm_out = group_norm(block_in)
    self.conv_out = nn.Conv2d(block_in, out_channels, 3, 1, 1)

  def forward(self, z):
    h = self.conv_in(z)
    for m in self.mid:
      h = m(h)
    for i_level, block in enumerate(self.conv_blocks):
      for i in range(self.num_res_blocks + 1):
        h = block.res[i](h)
        if len(block.attn) > 0:
          h = block.attn[i](h)
      if i_level != self.num_resolutions - 1:
        h = block.upsample(h)
    return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):

  def __init__(self, n_e: int, e_dim: int, beta: float, l2_norm: bool):
    super().__init__()
    self.n_e, self.e_dim, self.beta, self.l2_norm = n_e, e_dim, beta, l2_norm
    self.embedding = nn.Embedding(n_e, e_dim)
    self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
    if l2_norm:
      self.embedding.weight.data = F.normalize(self.embedding.weight.data, p=2, dim=-1)
    # The original keeps a rolling window of used codes as a (saved) buffer.
    self.register_buffer('codebook_used', torch.zeros(65536))

  def codes(self):
    w = self.embedding.weight
    return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

  def forward(self, z):
    """z: [B, D, h, w] -> (z_q [B, D, h, w], losses (vq, commit), indices [B*h*w])."""
    z = torch.einsum('bchw->bhwc', z).contiguous()
    flat = z.view(-1, self.e_dim)
    emb = self.codes()
    if self.l2_norm:
      z = F.normalize(z, p=2, dim=-1)
      flat = F.normalize(flat, p=2, dim=-1)
    d = (torch.sum(flat ** 2, dim=1, keepdim=True) + torch.sum(emb ** 2, dim=1)
         - 2 * torch.einsum('bd,dn->bn', flat, emb.t()))
    idx = torch.argmin(d, dim=1)
    z_q = emb[idx].view(z.shape)
    vq_loss = torch.mean((z_q - z.detach()) ** 2)
    commit_loss = self.beta * torch.mean((z_q.detach() - z) ** 2)
    z_q = z + (z_q - z).detach()
    return torch.einsum('bhwc->bchw', z_q), (vq_loss, commit_loss), idx

  def get_codebook_entry(self, indices, shape):
    """indices: [B*h*w] or [B, h, w]; shape (B, D, h, w) -> [B, D, h, w]."""
    z_q = self.codes()[indices]
    return z_q.reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):

  def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256,
               codebook_size=16384, codebook_embed_dim=8, codebook_l2_norm=True, commit_loss_beta=0.25,
               dropout=0.0):
    super().__init__()
    self.encoder = Encoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, dropout=dropout,
                           z_channels=z_channels)
    self.decoder = Decoder(z_channels=z_channels, ch=ch, ch_mult=ch_mult,
                           num_res_blocks=num_res_blocks, dropout=dropout)
    self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim, commit_loss_beta,
                                    codebook_l2_norm)
    self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, 1)
    self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, 1)

  def encode_latents(self, x):
    return self.quant_conv(self.encoder(x))

  def encode(self, x):
    return self.quantize(self.encode_latents(x))

  def decode(self, quant):
    return self.decoder(self.post_quant_conv(quant))

  def decode_code(self, indices, shape):
    return self.decode(self.quantize.get_codebook_entry(indices, shape))

  def forward(self, x):
    quant, losses, _ = self.encode(x)
    return self.decode(quant), losses


def compute_entropy_loss(affinity, loss_type='softmax', temperature=0.01):
  """LlamaGen's entropy loss on code affinities (-distances), [N, K] -> scalar."""
  flat_affinity = affinity.reshape(-1, affinity.shape[-1]) / temperature
  probs = F.softmax(flat_affinity, dim=-1)
  log_probs = F.log_softmax(flat_affinity + 1e-5, dim=-1)
  if loss_type != 'softmax':
    raise ValueError(f'Entropy loss {loss_type} not supported')
  avg_probs = torch.mean(probs, dim=0)
  avg_entropy = -torch.sum(avg_probs * torch.log(avg_probs + 1e-5))
  sample_entropy = -torch.mean(torch.sum(probs * log_probs, dim=-1))
  return sample_entropy - avg_entropy
