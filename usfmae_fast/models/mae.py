"""MaskedAutoencoderViT: fb/mae ``models_mae.py`` with the same parameter names, init and
semantics, running masking, attention and the loss through ``usfmae_fast.ops``."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .vit import Block, PatchEmbed, layer_norm, pair, sincos_2d

PRESETS = {  # encoder sizes of fb/mae (tiny/small as in DeiT); the decoder is 512 x 8, 16 heads
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


class MaskedAutoencoderViT(nn.Module):
    """Masked autoencoder with a ViT backbone; ``model.config`` holds the constructor kwargs."""

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_pix_loss: bool = False, drop_path_rate: float = 0.0):
        super().__init__()
        sizes = dict(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                     num_heads=num_heads, decoder_embed_dim=decoder_embed_dim,
                     decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads)
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for dim, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            if sizes[dim] % sizes[heads]:
                raise ValueError(f"{dim} = {sizes[dim]} is not divisible by "
                                 f"{heads} = {sizes[heads]}")
        height, width = pair(img_size)
        self.config = dict(img_size=height if height == width else [height, width], **sizes,
                           mlp_ratio=float(mlp_ratio), norm_pix_loss=bool(norm_pix_loss),
                           drop_path_rate=float(drop_path_rate))
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss

        # encoder
        self.patch_embed = PatchEmbed((height, width), patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim),
                                      requires_grad=False)  # fixed sin-cos embedding
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # timm's rule
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, drop_path=r)
                                    for r in rates)
        self.norm = layer_norm(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                            for _ in range(decoder_depth))
        self.decoder_norm = layer_norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)

        self.initialize_weights()

    def initialize_weights(self) -> None:
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], grid, cls_token=True))
        self.decoder_pos_embed.data.copy_(
            sincos_2d(self.decoder_pos_embed.shape[-1], grid, cls_token=True))
        # like nn.Linear instead of nn.Conv2d; the conv bias keeps PyTorch's default (as fb/mae)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    def check_imgs(self, imgs) -> None:
        if not isinstance(imgs, torch.Tensor):
            raise TypeError(f"imgs must be a torch.Tensor, got {type(imgs).__name__}")
        if not imgs.is_floating_point():
            raise TypeError(f"imgs must be a floating-point tensor, got {imgs.dtype}")
        expected = (self.in_chans, *self.patch_embed.img_size)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(f"imgs must have shape [N, {', '.join(map(str, expected))}] "
                             f"(N, in_chans, height, width), got {tuple(imgs.shape)}")

    def _embed(self, imgs: torch.Tensor) -> torch.Tensor:
        self.check_imgs(imgs)
        return (self.patch_embed(imgs) + self.pos_embed[:, 1:, :]).contiguous()

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float = 0.75,
                        noise: torch.Tensor | None = None):
        """``-> (latent [N, 1+K, D], mask [N, L], ids_restore [N, L])``; cls token after masking."""
        x, mask, ids_restore = ops.random_masking(self._embed(imgs), mask_ratio, noise)
        return self._encode(x), mask, ids_restore

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder on all patches, no masking: ``[N, 1+L, D]`` after the final norm (= timm)."""
        return self._encode(self._embed(imgs))

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``-> pred [N, L, p*p*C]`` (pixels in (p, p, C) order, as ``ops.patchify``)."""
        x = self.decoder_embed(latent)
        n, kept, dim = x.shape
        mask_tokens = self.mask_token.expand(n, ids_restore.shape[1] + 1 - kept, dim)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x[:, 1:, :])  # dropping cls first keeps pred contiguous

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the removed patches (per-patch normalised if norm_pix_loss)."""
        return ops.mae_loss(imgs.contiguous(), pred, mask, self.patch_embed.patch_size,
                            self.norm_pix_loss)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75,
                noise: torch.Tensor | None = None):
        """``-> (loss, pred [N, L, p*p*C], mask [N, L])``; ``noise [N, L]`` fixes the masking."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def mae_vit(size: str = "base", **overrides) -> MaskedAutoencoderViT:
    """A preset encoder size ("tiny", "small", "base", "large", "huge"); any kwarg overrides."""
    if size not in PRESETS:
        raise ValueError(f"size must be one of {tuple(PRESETS)}, got {size!r}")
    return MaskedAutoencoderViT(**{**PRESETS[size], **overrides})


def mae_vit_tiny_patch16(**overrides) -> MaskedAutoencoderViT:
    return mae_vit("tiny", **overrides)


def mae_vit_small_patch16(**overrides) -> MaskedAutoencoderViT:
    return mae_vit("small", **overrides)


def mae_vit_base_patch16(**overrides) -> MaskedAutoencoderViT:
    return mae_vit("base", **overrides)


def mae_vit_large_patch16(**overrides) -> MaskedAutoencoderViT:
    return mae_vit("large", **overrides)


def mae_vit_huge_patch14(**overrides) -> MaskedAutoencoderViT:
    return mae_vit("huge", **overrides)
