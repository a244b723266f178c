"""MoCo v1/v2 (He et al. 2020; Chen et al. 2020c), after facebookresearch/moco@7397dfe moco/builder.py.

Single-process shuffle-BN: the key encoder sees the batch in a random order and its BatchNorm runs on
sub-batches (``backbone.bn_splits``), so a query and its key are normalised with different statistics,
as moco's CIFAR demo does. The queue is updated FIFO and may hold a K that is not a multiple of the
batch size (moco asserts divisibility; we wrap around instead).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers import distributed as D
from trainers.augment import to_device
from trainers.heads import Encoder
from trainers.losses import info_nce, info_nce_selected
from trainers.negatives import hard_negative_index


class MoCo(nn.Module):
    def __init__(self, encoder: Encoder, dim: int, K: int = 65536, m: float = 0.999, T: float = 0.07,
                 hard: tuple[float, float, float] | None = None):
        """dim: z's dimension; K: queue size; m: key-encoder momentum; T: softmax temperature
        (moco defaults: K 65536, m 0.999, T 0.07 for v1, 0.2 for v2). ``hard``: (shape, loc, scale)
        of the skew-normal hard-negative sampler (trainers/negatives.py), or None for all K."""
        super().__init__()
        self.K, self.m, self.T, self.hard = K, m, T, hard
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder)
        for p_k in self.encoder_k.parameters():
            p_k.requires_grad = False  # not updated by gradient
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))  # C×K
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

        self._ptr: int | None = None  # queue_ptr mirrored on the host, so no step reads it back

    def _load_from_state_dict(self, *args, **kwargs):  # a resumed queue_ptr replaces the mirror
        self._ptr = None
        return super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """θ_k ← m·θ_k + (1 − m)·θ_q, in two foreach kernels over all tensors."""
        k_params = list(self.encoder_k.parameters())
        torch._foreach_mul_(k_params, self.m)
        torch._foreach_add_(k_params, [p.detach() for p in self.encoder_q.parameters()], alpha=1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest len(keys) entries of the queue by keys (N×C)."""
        n = keys.shape[0]
        if self._ptr is None:
            self._ptr = int(self.queue_ptr)  # once per run
        ptr = self._ptr
        if n >= self.K:  # more keys than slots: keep the newest K
            keys, n, ptr = keys[-self.K:], self.K, 0
        idx = (ptr + torch.arange(n, device=keys.device)) % self.K
        self.queue[:, idx] = keys.T.to(self.queue.dtype)
        self._ptr = (ptr + n) % self.K
        self.queue_ptr.fill_(self._ptr)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, g: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """im_q, im_k: two views of this rank's b rows of the global batch of B = b·W, b×3×H×W.
        Returns (loss, logits b×(1+K)), computed in fp32 whatever the autocast dtype."""
        q = F.normalize(self.encoder_q(im_q).float(), dim=1)  # queries: b×C
        with torch.no_grad():
            self._momentum_update_key_encoder()
            x_all = D.gather(im_k)  # B×3×H×W: moco's _batch_shuffle_ddp gathers the key images
            perm = torch.randperm(x_all.shape[0], generator=g)  # shuffle-BN, across ranks (same g on all)
            dev_perm = to_device(perm, im_k.device)
            k_shuffled = F.normalize(self.encoder_k(D.local(x_all[dev_perm])).float(), dim=1)  # b×C, BN over this rank's slice
            k_all = D.gather(k_shuffled)[to_device(torch.argsort(perm), im_k.device)]  # keys of the whole batch: B×C, in order
            k = D.local(k_all)  # this rank's keys: b×C
        queue = self.queue.clone().detach()
        if self.hard is None:
            loss, logits = info_nce(q, k, queue, self.T)
        else:
            index = hard_negative_index(q.detach(), queue, *self.hard, g)  # N×K, hard ones most often
            loss, logits = info_nce_selected(q, k, queue, index, self.T)
        self._dequeue_and_enqueue(k_all)  # every rank enqueues every rank's keys: the queues stay equal
        return loss, logits
