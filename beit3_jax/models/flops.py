"""Analytic FLOP counts of the models and of a training step (for MFU, `trainer.flops`).

One multiply-add is 2 FLOPs. For a transformer of width D, FFN width F and L layers, a
sequence of S tokens costs, forward,

    L * (S * (8 D^2 + 4 D F) + 4 S^2 D)

(q, k, v and output projections 4 * 2 D^2 per token; the two FFN matrices 2 * 2 D F per token;
scores Q K^T and the weighted sum of V, 2 * 2 S^2 D per sequence; no causal discount: BEiT-3's
attention is bidirectional), plus the patch projection 2 N_p P^2 C D per image and each head
2 D V per predicted position. Multiway routing does not change the count: every token goes
through exactly one expert. Training costs 3x the forward of what is trained (forward, and
backward through activations and weights), plus 1x the forward of frozen parts (the visual
tokenizer). Softmax, norms, GELU and the optimizer are left out (as in MaxText and PaLM's MFU).
"""

from __future__ import annotations


def encoder_forward_flops(seq_len: int, embed_dim: int, mlp_dim: int, depth: int) -> float:
  """Forward FLOPs of `depth` transformer layers on one sequence of `seq_len` tokens."""
  s, d, f = seq_len, embed_dim, mlp_dim
  return depth * (s * (8 * d * d + 4 * d * f) + 4 * s * s * d)


def patch_embed_flops(cfg) -> float:
  n = (cfg.img_size // cfg.patch_size) ** 2
  return 2 * n * cfg.patch_size ** 2 * cfg.in_chans * cfg.embed_dim


def beit3_forward_flops(cfg, *, images: bool, text_len: int = 0) -> float:
  """Forward FLOPs of the backbone on one example (image 1 + N_p tokens, then text)."""
  n = (cfg.img_size // cfg.patch_size) ** 2
  seq = (1 + n if images else 0) + text_len
  flops = encoder_forward_flops(seq, cfg.embed_dim, cfg.mlp_dim, cfg.depth)
  return flops + (patch_embed_flops(cfg) if images else 0)


def vqkd_encode_flops(cfg) -> float:
  """Forward FLOPs of the VQ-KD encoder + encode task layer + codebook lookup, one image."""
  n = (cfg.input_size // cfg.patch_size) ** 2
  flops = encoder_forward_flops(1 + n, cfg.embed_dim, cfg.mlp_dim, cfg.depth)
  flops += 2 * n * cfg.patch_size ** 2 * cfg.in_chans * cfg.embed_dim
  flops += n * (2 * cfg.embed_dim * cfg.embed_dim + 2 * cfg.embed_dim * cfg.code_dim)
  return flops + n * 2 * cfg.code_dim * cfg.n_embed


def vqkd_decode_flops(cfg) -> float:
  n = (cfg.input_size // cfg.patch_size) ** 2
  d = cfg.decoder_embed_dim
  flops = encoder_forward_flops(1 + n, d, cfg.decoder_mlp_dim, cfg.decoder_depth)
  flops += 2 * n * cfg.code_dim * d
  return flops + n * (2 * d * d + 2 * d * cfg.decoder_out_dim)


def pretraining_step_flops(model_cfg, tokenizer_cfg, batch_sizes, text_len: int, spec) -> float:
  """Training FLOPs of one masked-modeling step over the whole (global) batch."""
  flops = 0.0
  d = model_cfg.embed_dim
  b = dict(batch_sizes)
  if b.get('image'):
    per = 3 * (beit3_forward_flops(model_cfg, images=True) + 2 * spec.image_slots * d *
               tokenizer_cfg.n_embed) + vqkd_encode_flops(tokenizer_cfg)
    flops += b['image'] * per
  if b.get('text'):
    flops += b['text'] * 3 * (beit3_forward_flops(model_cfg, images=False, text_len=text_len)
                              + 2 * spec.text_slots * d * model_cfg.vocab_size)
  if b.get('pair'):
    per = 3 * (beit3_forward_flops(model_cfg, images=True, text_len=text_len)
               + 2 * spec.pair_text_slots * d * model_cfg.vocab_size
               + 2 * spec.pair_image_slots * d * tokenizer_cfg.n_embed)
    if spec.pair_image_slots:
      per += vqkd_encode_flops(tokenizer_cfg)
    flops += b['pair'] * per
  return flops


def tokenizer_step_flops(tokenizer_cfg, batch_size: int, teacher_forward_flops: float) -> float:
  """Training FLOPs of one VQ-KD step: 3x (encode + decode) + 1x the frozen teacher."""
  per = 3 * (vqkd_encode_flops(tokenizer_cfg) + vqkd_decode_flops(tokenizer_cfg))
  return batch_size * (per + teacher_forward_flops)
