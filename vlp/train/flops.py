"""Analytic model FLOPs and device peaks, for MFU.

Model FLOPs count the matmuls of one forward pass (2 FLOPs per multiply-add)
and triple them for forward + backward, as MaxText and the PaLM paper do.
Element-wise work (LayerNorm, softmax, GELU, IPOT iterations) is left out, so
MFU is a slight under-estimate of hardware utilisation.
"""

from __future__ import annotations

import jax

# Dense (no sparsity) bf16 peak FLOP/s of one JAX device, from the vendors' data
# sheets. A TPU v2/v3 chip is two JAX devices (one per core), hence half a chip;
# v4 and later show one device per chip. Volta has no bf16: its fp16 tensor-core
# peak is listed. Kinds not listed (and CPUs) get no MFU rather than a guess.
PEAK_BF16 = {
    "B200": 2250e12, "H200": 989e12, "H100": 989e12, "H100 PCIe": 756e12,
    "A100": 312e12, "L4": 121e12, "V100": 125e12,
    "TPU v2": 22.5e12, "TPU v3": 61.5e12, "TPU v4": 275e12,
    "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops(device: jax.Device) -> float | None:
  """The table's peak for `device.device_kind` (longest matching name), or None."""
  kind = getattr(device, "device_kind", "")
  for name, peak in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return peak
  return None


def batch_shapes(config) -> dict:
  """The static shapes of `config`'s pretraining batches: the keyword arguments of
  `train_flops_per_example` (and of `vlp.train.bench.synthetic_batch`)."""
  return dict(text_len=config.max_text_len, regions=config.max_regions,
              mlm_predictions=config.mlm.max_predictions,
              mrm_predictions=config.mrm.max_predictions)


def encoder_forward_flops(cfg, text_len: int, regions: int) -> float:
  h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  length = text_len + regions
  embed = 2 * regions * (cfg.img_dim * h + cfg.img_pos_dim * h)
  per_layer = 2 * length * (4 * h * h + 2 * h * i) + 2 * 2 * length * length * h
  pooler = 2 * h * h
  return float(embed + n * per_layer + pooler)


# The objectives `head_forward_flops` counts (the pretraining heads).
COUNTED_TASKS = ("mlm", "mrfr", "mrc", "mrckl", "itm")


def head_forward_flops(cfg, task: str, *, mlm_predictions: int, mrm_predictions: int,
                       text_len: int, regions: int) -> float:
  h = cfg.hidden_size
  if task == "mlm":
    return 2.0 * mlm_predictions * (h * h + h * cfg.vocab_size)
  if task == "mrfr":
    return 2.0 * mrm_predictions * (h * h + h * cfg.img_dim)
  if task in ("mrc", "mrckl"):
    return 2.0 * mrm_predictions * (h * h + h * cfg.num_region_classes)
  if task == "itm":
    return 2.0 * 2 * h + 2.0 * text_len * regions * h  # ITM head + OT cosine cost.
  raise ValueError(f"unknown task {task!r}")


def encoder_train_flops_per_example(cfg, config) -> float:
  """Forward + backward FLOPs of the encoder on one example of `config`'s padded
  shapes: the count of the VQA and grounding jobs, whose heads (a few matmuls per
  example, under 0.1 % of the encoder's at base size) are left out."""
  return 3.0 * encoder_forward_flops(cfg, config.max_text_len, config.max_regions)


def train_flops_per_example(cfg, task: str, **kw) -> float:
  fwd = encoder_forward_flops(cfg, kw["text_len"], kw["regions"]) + head_forward_flops(cfg, task, **kw)
  return 3.0 * fwd
