"""The Byte Latent Transformer: wires embeddings, patcher, encoder, global model and decoder.

`BLT(config)` is stateless between calls: `forward(tokens_BT, patch_lengths=None)` patches with
its own patcher when no lengths are given and returns next-byte logits [B, T, V] in fp32.
Legend: B batch, T bytes, P patches, K cross_attn_k, D width, V vocab (260).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..bytes import EOS_ID, check_ids
from ..config import BLTConfig
from . import patching
from .attention import (
    IMPLS,
    decoder_cross_mask,
    document_ids,
    encoder_cross_mask,
    global_mask,
    local_mask,
    packed_global_mask,
)
from .entropy import EntropyModel
from .global_transformer import GlobalTransformer
from .hashing import all_hash_ids
from .layers import rope_cos_sin, trunc_normal_
from .local_decoder import LocalDecoder
from .local_encoder import LocalEncoder
from .transformer import positions_cos_sin

PACK_MULTIPLE = 512  # the packed global sequence's length is a multiple of this (see BLT.pack_global)


def packed_length(n: int) -> int:
    """The slots for n packed patches: n rounded up to a multiple of PACK_MULTIPLE or of 1/8 of the
    largest power of two <= n, whichever is larger: under 1/8 more work past 4,096 patches, and
    at most 8 lengths per doubling (each length is one more compiled shape)."""
    step = max(PACK_MULTIPLE, 1 << max(n.bit_length() - 4, 0))
    return -(-n // step) * step


@dataclass
class PatchLayout:
    """Everything derived from the patch lengths of one batch."""

    lengths_BP: torch.Tensor  # T+1 convention
    pid_BT: torch.Tensor  # encoder patch of each byte
    dec_BT: torch.Tensor  # global patch each byte's decoder reads
    # (row, patch) of every non-empty patch, row-major, when the lengths came from the host: the
    # packed global run then needs no device sync to learn how many there are
    real_N: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def n_patches(self) -> int:
        return self.lengths_BP.shape[1]


class BLT(nn.Module):
    def __init__(self, config: BLTConfig):
        super().__init__()
        self.config = config
        c = config
        self.local_encoder = LocalEncoder(c.encoder, c.vocab_size, c.cross_attn_k, c.norm_eps)
        self.global_transformer = GlobalTransformer(c.global_transformer, c.cross_attn_k * c.encoder.dim, c.norm_eps)
        self.local_decoder = LocalDecoder(c.decoder, c.global_transformer.dim, c.vocab_size, c.cross_attn_k,
                                          c.norm_eps)
        self.encoder_hash_tok_embedding = (
            # one fused table (spec §5.2); a summing bag lookup adds all n-gram rows of a byte at once
            nn.EmbeddingBag(c.n_hash_tables * c.hash_vocab, c.encoder.dim, mode="sum") if c.n_hash_tables else None
        )
        self.entropy_model = EntropyModel(c.entropy_model) if c.entropy_model is not None else None
        if self.entropy_model is not None:
            self.entropy_model.requires_grad_(False)  # frozen patcher (spec §3)
        self.attn_impl = "sdpa"
        # compiled Flex specialises on shapes and the patch count is BLT's one dynamic shape:
        # forward pads it with empty patches to a multiple of `pad_patches_multiple`, and to at
        # least `pad_patches_floor`, which a training-mode forward raises to each padded count it
        # runs (grow-only: a few shapes per run; evaluation then reuses the training shapes).
        # Empty trailing patches change no logit (spec §4.5).
        self.pad_patches_multiple = 1
        self.pad_patches_floor = 0
        # the global transformer may run over the batch's real patches packed into one sequence
        # (block-diagonal mask, per-row positions) instead of B rows padded to the widest: rows
        # of a training batch hold 570 patches (median) against a widest of ~1,200-1,650
        # (docs/benchmarks.md). None: with Flex and several rows; True: whenever several rows;
        # False: never. The packed length is rounded up (`packed_length`) and, in training, to the
        # largest so far (few compiled shapes). The generator's prefill never packs.
        self.pack_global: bool | None = None
        self.pack_floor = 0

    # -- configuration -------------------------------------------------------------------------

    def set_attn_impl(self, impl: str) -> BLT:
        """"sdpa" (reference, dense masks, runs anywhere) or "flex" (block masks, for GPUs)."""
        if impl not in IMPLS:
            raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
        self.attn_impl = impl
        return self

    @property
    def device(self) -> torch.device:
        return self.local_encoder.tok_embeddings.weight.device

    # -- embeddings and patching ---------------------------------------------------------------

    def embed(self, tokens_BT: torch.Tensor, history_BH: torch.Tensor | None = None) -> torch.Tensor:
        """e_t = E_byte[x_t] + Σ_n E_hash[id_n(t)]: a plain sum (spec §5.2)."""
        e = self.local_encoder.tok_embeddings(tokens_BT)
        if self.encoder_hash_tok_embedding is not None:
            c = self.config
            ids_BTN = all_hash_ids(tokens_BT, c.hash_sizes, c.hash_functions, c.hash_vocab, history_BH)
            B, T, N = ids_BTN.shape
            e = e + self.encoder_hash_tok_embedding(ids_BTN.reshape(B * T, N)).view(B, T, -1)
        return e

    def patch_starts(self, tokens_BT: torch.Tensor, entropies_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean [B, T+1]: which positions start a patch under this model's patcher."""
        pc = self.config.patcher
        if pc.mode == "entropy" and entropies_BT is None:
            if self.entropy_model is None:
                raise ValueError("entropy patching needs an entropy model; load one or pass patch_lengths")
            entropies_BT = self.entropy_model.entropies(tokens_BT, impl=self.attn_impl,
                                                        doc_masks=self.config.doc_masks)
        return patching.starts_for(pc, tokens_BT, entropies_BT)

    @torch.no_grad()
    def patch(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Patch lengths [B, P] (T+1 convention, zero-padded) from this model's patcher."""
        return patching.starts_to_lengths(self.patch_starts(tokens_BT))

    def pad_lengths(self, patch_lengths_BP: torch.Tensor) -> torch.Tensor:
        """Right-pad with zero-length patches to the padded patch count (see __init__)."""
        m, P = self.pad_patches_multiple, patch_lengths_BP.shape[1]
        target = max(self.pad_patches_floor, -(-P // m) * m) if m > 1 else P
        target = max(P, min(target, self.config.max_patches))
        return torch.nn.functional.pad(patch_lengths_BP, (0, target - P)) if target > P else patch_lengths_BP

    def layout(self, patch_lengths_BP: torch.Tensor, T: int, B: int | None = None, validate: bool = True
               ) -> PatchLayout:
        lengths = patching.normalize_lengths(patch_lengths_BP, T, validate)
        real = None
        if lengths.device.type == "cpu" and self.packs_global(lengths.shape[0]):
            # host lengths: the packed run's indices with no device sync
            real = tuple(i.to(self.device, non_blocking=True) for i in torch.nonzero(lengths > 0, as_tuple=True))
        lengths = lengths.to(self.device, non_blocking=True)
        if B is not None and lengths.shape[0] != B:
            raise ValueError(f"patch_lengths has batch size {lengths.shape[0]} but tokens have batch size {B}")
        if lengths.shape[1] > self.config.max_patches:
            raise ValueError(f"{lengths.shape[1]} patches exceed the global transformer's limit of "
                             f"{self.config.max_patches} (config.max_patches); use shorter inputs")
        pid, dec = patching.patch_ids(lengths, T)
        return PatchLayout(lengths, pid, dec, real)

    # -- forward -------------------------------------------------------------------------------

    def check_tokens(self, tokens_BT: torch.Tensor, validate: bool = True) -> None:
        if tokens_BT.dim() != 2:
            raise ValueError(f"tokens must be [batch, bytes], got shape {tuple(tokens_BT.shape)}")
        if tokens_BT.shape[1] == 0:
            raise ValueError("empty input: a sequence needs at least the BOS id")
        if tokens_BT.shape[1] > self.config.max_bytes:
            raise ValueError(f"sequence of {tokens_BT.shape[1]} bytes exceeds the model's limit of "
                             f"{self.config.max_bytes} (config.max_bytes)")
        if validate:
            check_ids(tokens_BT, self.config.vocab_size)

    def forward(self, tokens_BT: torch.Tensor, patch_lengths: torch.Tensor | None = None,
                validate: bool = True) -> torch.Tensor:
        """Next-byte logits [B, T, V] (fp32); `logits[:, t]` predicts byte t+1.

        Args:
            tokens_BT: ids with BOS first (see `bltkit.bytes.encode`).
            patch_lengths: [B, P] lengths starting with a length-1 patch and summing to T or T+1
                per row; None patches with the model's own patcher.
            validate: check the ids' range and the lengths' values (a clear error for bad input).
                Each check reads a device tensor on the host, a sync that stops the host from
                queueing work ahead of a GPU; the trainer, whose batches are valid by construction
                (bytes from its loader, lengths from `starts_to_lengths`: the T+1 convention),
                passes False.
        """
        self.check_tokens(tokens_BT, validate)
        T = tokens_BT.shape[1]
        if patch_lengths is None:
            patch_lengths = self.patch(tokens_BT)
        patch_lengths = self.pad_lengths(patch_lengths)
        if self.training and self.pad_patches_multiple > 1:
            self.pad_patches_floor = patch_lengths.shape[1]
        lay = self.layout(patch_lengths, T, tokens_BT.shape[0], validate)
        return self.forward_layout(tokens_BT, lay)

    def forward_layout(self, tokens_BT: torch.Tensor, lay: PatchLayout, capture: dict | None = None
                       ) -> torch.Tensor:
        """The forward for a given layout. `capture` (a dict) receives what the generator's
        prefill needs: per-layer keys/values of the three stacks, the encoder's per-layer byte
        states, the global outputs and the patch-document ids."""
        cap = capture if capture is not None else {}
        kv = {k: ([] if capture is not None else None) for k in ("enc_kv", "enc_h", "g_kv", "dec_kv")}
        c, impl, dev = self.config, self.attn_impl, tokens_BT.device
        B, T = tokens_BT.shape
        P, K = lay.n_patches, c.cross_attn_k
        doc = document_ids(tokens_BT) if c.doc_masks else None
        enc_self = local_mask(T, c.encoder.window, doc, B, dev, impl)
        dec_self = enc_self if c.decoder.window == c.encoder.window else local_mask(T, c.decoder.window, doc, B,
                                                                                      dev, impl)
        enc_cos, enc_sin = positions_cos_sin(T, c.encoder, dev)
        h, units = self.local_encoder(self.embed(tokens_BT), lay.pid_BT, P, enc_self,
                                      encoder_cross_mask(lay.pid_BT, P, K, impl), enc_cos, enc_sin,
                                      kv["enc_kv"], kv["enc_h"])
        g_in = units.reshape(B, P, K * c.encoder.dim)  # concat_k
        pdoc = self.patch_documents(tokens_BT, lay) if c.doc_masks else None
        if capture is None and self.packs_global(B):
            g = self._global_packed(g_in, pdoc, lay)
        else:
            g_cos, g_sin = positions_cos_sin(P, c.global_transformer, dev)
            g = self.global_transformer(g_in, global_mask(P, pdoc, B, dev, impl), g_cos, g_sin, kv["g_kv"])
        dec_cos, dec_sin = (enc_cos, enc_sin) if c.decoder.head_dim == c.encoder.head_dim and \
            c.decoder.rope_theta == c.encoder.rope_theta else positions_cos_sin(T, c.decoder, dev)
        logits = self.local_decoder(h, g, dec_self, decoder_cross_mask(lay.dec_BT, P, K, impl), dec_cos, dec_sin,
                                    kv["dec_kv"])
        if capture is not None:
            cap.update(kv, g=g, pdoc=pdoc)
        return logits

    def packs_global(self, B: int) -> bool:
        """Does a forward of B rows run the global transformer packed (`pack_global`; by default
        with Flex and several rows)? (The generator's prefill, which captures caches, never does.)"""
        pack = self.pack_global if self.pack_global is not None else self.attn_impl == "flex"
        return bool(pack) and B > 1

    def _global_packed(self, g_in_BPD: torch.Tensor, pdoc_BP: torch.Tensor | None, lay: PatchLayout) -> torch.Tensor:
        """The global transformer over the real patches of all rows packed into one sequence:
        the same outputs as the padded [B, P] run for every real patch (zeros for padding slots,
        which no byte reads), with work for sum(n_b) patches instead of B x P."""
        B, P, _ = g_in_BPD.shape
        dev, cfg = g_in_BPD.device, self.config.global_transformer
        # real patches (padding adds only trailing empty ones), row-major: slot i holds the i-th
        # of them. nonzero is the one host sync (the packed length), unless the layout has them
        b_N, p_N = lay.real_N if lay.real_N is not None else torch.nonzero(lay.lengths_BP > 0, as_tuple=True)
        N = b_N.numel()
        C = max(packed_length(N), self.pack_floor)
        if self.training:
            self.pack_floor = C
        pad = C - N  # padding slots: a row of their own (B), position 0
        row_C = F.pad(b_N, (0, pad), value=B)
        pos_C = F.pad(p_N, (0, pad))
        n_B = (lay.lengths_BP > 0).sum(1)  # real patches per row (bincount would sync on a GPU)
        row_start_C = torch.cat([n_B.cumsum(0) - n_B, torch.full((1,), N, device=dev, dtype=n_B.dtype)])[row_C]
        pdoc_C = F.pad(pdoc_BP[b_N, p_N], (0, pad)) if pdoc_BP is not None else None
        x_C = F.pad(g_in_BPD[b_N, p_N], (0, 0, 0, pad))
        cos, sin = rope_cos_sin(pos_C[None], cfg.head_dim, cfg.rope_theta)
        mask = packed_global_mask(row_C, pdoc_C, row_start_C, self.attn_impl)
        y_C = self.global_transformer(x_C[None], mask, cos, sin)[0]
        out = y_C.new_zeros(B, P, y_C.shape[-1])
        out[b_N, p_N] = y_C[:N]
        return out

    @staticmethod
    def patch_documents(tokens_BT: torch.Tensor, lay: PatchLayout) -> torch.Tensor:
        """Patch-document id: a patch holding an EOS ends its document (spec §6.5)."""
        B = tokens_BT.shape[0]
        has_eos = torch.zeros(B, lay.n_patches, dtype=torch.int32, device=tokens_BT.device)
        has_eos.scatter_reduce_(1, lay.pid_BT, (tokens_BT == EOS_ID).to(torch.int32), reduce="amax")
        return has_eos.cumsum(1) - has_eos

    # -- weights -------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int = 42) -> None:
        """Meta's from-scratch initialisation (spec §6.7), deterministic for a seed."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        self.local_encoder.init_weights(g)
        if self.encoder_hash_tok_embedding is not None:
            trunc_normal_(self.encoder_hash_tok_embedding.weight, self.config.encoder.dim**-0.5, g)
        self.global_transformer.init_weights(g)
        self.local_decoder.init_weights(g)
        if self.entropy_model is not None:
            self.entropy_model.init_weights(seed + 1)

    def blt_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the BLT proper (the entropy model is stored in its own folder)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("entropy_model.")}
