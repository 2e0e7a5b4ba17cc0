"""The spectral transformer encoder (torch).

Input: the ``raw`` featurizer's continuum-normalised flux and its ivar on a fixed log-lambda grid,
``(B, n_pix)`` each. Steps (all batched tensors, no per-spectrum Python):

1. per-spectrum z-score over the *valid* pixels only (``ivar > 0``); ``log10(std)`` is kept as a
   scale token; invalid pixels are zero-filled and flagged in a mask channel, so whatever value
   they held never reaches the network;
2. overlapping patches (``patch`` pixels, ``stride`` apart; the grid is padded on the right with
   invalid pixels so every pixel is covered) -> ``patch_embed`` (a linear map of the patch values
   and their validity mask) -> tokens;
3. patch tokens without any valid pixel (gaps in the data) are replaced by the learned
   ``mask_token``, exactly as the masked tokens of pretraining are, so the network meets missing
   data only in the form it learned to fill in; partly valid patches keep their mask channel;
4. ``[scale token] + patch tokens`` + learned positions -> pre-norm blocks -> final LayerNorm;
5. pooling to one vector: ``mean`` over all tokens, or ``attention`` with a learned query
   (trained by the auxiliary objective in :meth:`SpectralEncoder.pretrain_losses`).

Module names are part of the contract (the LoRA adapter targets them): ``blocks.N.attn.qkv``,
``blocks.N.attn.proj``, ``blocks.N.mlp.fc1``, ``blocks.N.mlp.fc2``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import POOLINGS, EncoderConfig

__all__ = ["EncoderConfig", "EncoderFront", "SpectralEncoder", "contiguous_chunk_mask", "count_parameters",
           "POOLINGS"]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(round(width * mlp_ratio)), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttentionPool(nn.Module):
    """One learned query attending over the tokens (multi-head)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, width))
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, c = h.shape
        kv = self.kv(h).reshape(b, t, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        q = self.query.expand(b, 1, c).reshape(b, 1, self.heads, c // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, c))


class SpectralEncoder(nn.Module):
    """Masked-patch spectral transformer; ``forward(flux, ivar, pooling)`` -> ``(B, width)``."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = nn.Linear(2 * c.patch, c.width)
        self.scale_embed = nn.Linear(1, c.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.n_tokens, c.width))
        self.mask_token = nn.Parameter(torch.zeros(c.width))
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_ratio, c.dropout) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)
        # pretraining heads: masked-patch reconstruction, and the attention pool's auxiliary target
        self.decoder = nn.Linear(c.width, c.patch)
        self.attn_pool = AttentionPool(c.width, c.heads)
        self.pool_decoder = nn.Linear(c.width, c.n_patches)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.attn_pool.query, std=0.02)

    @property
    def width(self) -> int:
        return self.config.width

    # ---------------------------------------------------------------------------- tokenisation
    def prepare(self, flux: torch.Tensor, ivar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patches of the z-scored flux ``(B, P, patch)``, their validity ``(B, P, patch)`` (bool)
        and ``log10(std)`` ``(B,)``. Invalid pixels are 0 in the values whatever the input held."""
        c = self.config
        if flux.ndim != 2 or flux.shape[1] != c.n_pix or ivar.shape != flux.shape:
            raise ValueError(f"encoder expects flux and ivar of shape (B, {c.n_pix}), got "
                             f"{tuple(flux.shape)} and {tuple(ivar.shape)}")
        flux = flux.float()
        valid = (ivar > 0) & torch.isfinite(flux) & torch.isfinite(ivar)
        vf = valid.float()
        flux = torch.where(valid, flux, torch.zeros_like(flux))
        n = vf.sum(1).clamp_min(1.0)
        mean = (flux * vf).sum(1) / n
        var = (((flux - mean[:, None]) * vf) ** 2).sum(1) / n
        std = var.sqrt().clamp_min(c.std_floor)
        z = torch.where(valid, (flux - mean[:, None]) / std[:, None], torch.zeros_like(flux))
        pad = c.n_padded - c.n_pix
        if pad:
            z = F.pad(z, (0, pad))
            valid = F.pad(valid, (0, pad))
        values = z.unfold(1, c.patch, c.stride)
        vmask = valid.unfold(1, c.patch, c.stride)
        return values, vmask, torch.log10(std)

    def encode(self, values: torch.Tensor, valid: torch.Tensor, log_std: torch.Tensor,
               token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``(B, 1 + P, width)``, token 0 being the scale token. Patches without a
        valid pixel, and those in ``token_mask`` (B, P) (pretraining), become the mask token."""
        vf = valid.to(values.dtype)
        x = self.patch_embed(torch.cat([values * vf, vf], dim=-1))
        hole = ~valid.any(-1)
        if token_mask is not None:
            hole = hole | token_mask
        x = torch.where(hole[..., None], self.mask_token.to(x.dtype), x)
        s = self.scale_embed(log_std[:, None].to(x.dtype))[:, None, :]
        x = torch.cat([s, x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def pool(self, h: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
        if pooling == "mean":
            return h.mean(1)
        if pooling == "attention":
            return self.attn_pool(h)
        raise ValueError(f"unknown pooling {pooling!r} (choose from {', '.join(POOLINGS)})")

    def forward(self, flux: torch.Tensor, ivar: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
        """Embeddings ``(B, width)`` of raw-featurizer spectra (differentiable: adapters use it)."""
        values, valid, log_std = self.prepare(flux, ivar)
        return self.pool(self.encode(values, valid, log_std), pooling)

    # ------------------------------------------------------------------------------ pretraining
    def pretrain_losses(self, flux: torch.Tensor, ivar: torch.Tensor,
                        token_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``mse``: mean squared error of the reconstructed z-scored flux over the valid pixels of
        the masked patches only. ``aux``: the attention-pooled vector of the (masked) spectrum
        predicts every patch's mean z-flux (valid patches only) -- this trains the learned query
        and makes the pooled vector a summary of the whole spectrum."""
        values, valid, log_std = self.prepare(flux, ivar)
        h = self.encode(values, valid, log_std, token_mask)
        pred = self.decoder(h[:, 1:]).float()
        w = (valid & token_mask[..., None]).float()
        mse = (w * (pred - values) ** 2).sum() / w.sum().clamp_min(1.0)
        vf = valid.float()
        cnt = vf.sum(-1)
        target = (values * vf).sum(-1) / cnt.clamp_min(1.0)
        tw = (cnt > 0).float()
        coarse = self.pool_decoder(self.attn_pool(h)).float()
        aux = (tw * (coarse - target) ** 2).sum() / tw.sum().clamp_min(1.0)
        return {"mse": mse, "aux": aux, "n_masked_px": w.sum()}


class EncoderFront(nn.Module):
    """raw features + ivar -> pooled embedding, exactly as the ``transformer`` featurizer makes
    them (a spectrum without any valid pixel embeds to 0): the part of a model that the encoder
    adapters (``lora`` / ``full`` with ``target=encoder``) fine-tune. ``self.encoder`` is the
    :class:`SpectralEncoder`, whose module names the adapters target."""

    def __init__(self, encoder: SpectralEncoder, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r} (choose from {', '.join(POOLINGS)})")
        self.encoder = encoder
        self.pooling = pooling

    @property
    def dim(self) -> int:
        return self.encoder.width

    def forward(self, flux: torch.Tensor, ivar: torch.Tensor) -> torch.Tensor:
        emb = self.encoder(flux, ivar, self.pooling)
        has = ((ivar > 0) & torch.isfinite(flux)).any(1)
        return torch.where(has[:, None], emb, torch.zeros((), dtype=emb.dtype, device=emb.device))


def contiguous_chunk_mask(batch: int, n_tokens: int, frac: float, chunk: int,
                          generator: torch.Generator | None = None, device: Any = "cpu") -> torch.Tensor:
    """Bool ``(batch, n_tokens)``: per row, ``round(frac * n_tokens)`` tokens masked exactly, in
    non-overlapping contiguous chunks of ``chunk`` tokens (the last one shorter if needed), placed
    uniformly at random."""
    if not 0.0 <= frac <= 1.0:
        raise ValueError("mask fraction must be in [0, 1]")
    if chunk < 1:
        raise ValueError("mask chunk length must be >= 1")
    m = int(round(frac * n_tokens))
    out = torch.zeros(batch, n_tokens, dtype=torch.bool, device=device)
    if m == 0 or batch == 0:
        return out
    length = min(chunk, m)
    k = math.ceil(m / length)
    lens = torch.full((k,), length, dtype=torch.long)
    lens[-1] = m - (k - 1) * length
    # Choose k distinct slots among R = n - m + k; chunk i starts at slot_i + sum_{j<i}(len_j - 1).
    slots_total = n_tokens - m + k
    r = torch.rand(batch, slots_total, generator=generator)
    slots = torch.sort(torch.argsort(r, dim=1)[:, :k], dim=1).values
    offsets = torch.cumsum(lens - 1, 0) - (lens - 1)
    starts = slots + offsets[None, :]
    pos = torch.arange(n_tokens)
    inside = (pos[None, None, :] >= starts[..., None]) & (pos[None, None, :] < (starts + lens[None, :])[..., None])
    return inside.any(1).to(device)


def count_parameters(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))



def random_gaps(ivar: torch.Tensor, prob: float, max_gaps: int, max_len: int, max_pix_frac: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Augmentation: a copy of ``ivar`` where, in a ``prob`` fraction of the rows, 1 to
    ``max_gaps`` runs of 1 to ``max_len`` pixels are set to 0 (missing), and a further fraction
    drawn uniformly from ``[0, max_pix_frac]`` of single pixels, so pretraining meets the gaps
    (bad columns, masked lines, arm edges, bad pixels) that real spectra have."""
    b, n = ivar.shape
    if prob <= 0 or b == 0:
        return ivar
    hit = torch.rand(b, generator=generator) < prob
    gap = torch.zeros(b, n, dtype=torch.bool)
    if max_gaps >= 1 and max_len >= 1:
        count = torch.randint(1, max_gaps + 1, (b,), generator=generator)
        start = torch.randint(0, n, (b, max_gaps), generator=generator)
        length = torch.randint(1, max_len + 1, (b, max_gaps), generator=generator)
        use = torch.arange(max_gaps)[None, :] < count[:, None]
        pos = torch.arange(n)
        gap = ((pos[None, None, :] >= start[..., None]) & (pos[None, None, :] < (start + length)[..., None])
               & use[..., None]).any(1)
    if max_pix_frac > 0:
        rate = torch.rand(b, 1, generator=generator) * max_pix_frac
        gap = gap | (torch.rand(b, n, generator=generator) < rate)
    gap = gap & hit[:, None]
    return torch.where(gap.to(ivar.device), torch.zeros_like(ivar), ivar)
