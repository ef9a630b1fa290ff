"""TerraMind stage 3: SAR grounding with LoRA on the decoder's cross-attention (the TerraMind
stage-3 project's `stage3.lowvr.yaml`; docs/terramind-stage3.md).

    python -m jaxvit.main --config=configs/terramind_stage3.py --workdir=runs/stage3 \
        --config.data.data_dir=tiles/ \
        --config.sar_grounding.terramind=TerraMind_v1_base.pt \
        --config.sar_grounding.tokenizer=TerraMind_Tokenizer_S2L2A.pt \
        --config.sar_grounding.s1_tokenizer=TerraMind_Tokenizer_S1GRD.pt \
        --config.sar_grounding.perceptual_backbone=facebook/dinov2-small
    # the project's overrides: --config.optim.lr=5e-5  --config.lora.rank=16  --config.train.steps=20000

`tiles/pairs.csv` lists S1 / S2L2A GeoTIFF (or .npy) pairs (`jaxvit.tasks.sar_grounding.pairs`). Step-based: 30k steps of a
global batch 8 (the project's batch 1 x grad-accum 8: here batch_size=8, grad_accum=8 micro-batches of 1), AdamW 1e-4
with weight decay 1e-5, 500 warmup steps then cosine to 1e-6, clip 1.0, rank-8 / alpha-16 LoRA on
`decoder/*/cross_attn/{q,kv,proj}` only, frozen weights stored in bf16. Evaluated every 500 steps (SAR agreement,
change from the base model); patience can stop it, never before `train.min_steps` (15k).
Variants: `:overfit` (one batch of 8 tiles repeated, token term alone: its loss should approach 0), `:debug_nans` (the first non-finite
value stops the run naming the operation and the non-finite gradients' parameter paths), `:demo` (synthetic
paired tiles, a tiny random TerraMind and tokenizers, on the CPU in minutes).
"""
from jaxvit.config import apply_variant, base_config
from jaxvit.tasks.sar_grounding import pairs as sar_pairs


def get_config(arg: str = ""):
    c = base_config("sar_grounding")
    c.data.update(sar_pairs.CONFIG_DEFAULTS)
    c.data.image_size = 224
    c.data.num_workers = 2
    c.model.arch, c.model.pretrained = "dinov3_vits16", ""  # unused (the model is TerraMind): patch 16 as its
    c.model.dtype = "bfloat16"  # the project's mixed_precision (fp16 AMP); bf16 needs no loss scaling
    c.model.frozen_dtype = "bfloat16"
    c.lora.enabled, c.lora.rank, c.lora.alpha, c.lora.dropout = True, 8, 16.0, 0.0
    c.lora.targets = (r"decoder/.*/cross_attn/(q|kv|proj)",)  # freeze_base_model: everything else frozen
    c.train.steps = 30000  # max_steps
    c.train.min_steps = 15000  # no early stop before
    c.train.batch_size, c.train.grad_accum = 8, 8
    c.train.phases = ({"name": "lora", "trainable": "all", "patience": 10},)
    c.optim.lr, c.optim.weight_decay = 1e-4, 1e-5
    c.optim.warmup_steps = 500
    c.optim.lr_min_ratio = 1e-6 / 1e-4
    c.optim.grad_clip = 1.0
    c.eval.every_steps = 500  # SAR agreement "every 500 steps"
    c.eval.batch_size = 8
    c.checkpoint.best_metric, c.checkpoint.best_mode = "val/sar_agreement", "max"
    return apply_variant(c, arg, "terramind_stage3.py", overfit=overfit, debug_nans=debug_nans, demo=demo)


def overfit(c):
    """The project's overfit_single_batch: one batch of 8 training tiles, no augmentation, the token term alone (the
    pixel terms have floors above 0: a generated tile never correlates perfectly with SAR): the loss must go to ~0."""
    c.data.train_limit = 8
    c.data.aug.hflip = c.data.aug.vflip = c.data.aug.rot90 = False
    s = c.sar_grounding
    s.spectral_weight = s.sar_consistency_weight = s.cycle_weight = s.identity_weight = s.perceptual_weight = 0.0
    c.train.steps, c.train.min_steps, c.train.phases, c.train.grad_accum = 200, 0, (), 1
    c.optim.lr, c.optim.warmup_steps, c.optim.schedule, c.optim.weight_decay = 1e-3, 10, "constant", 0.0
    c.eval.every_steps = 50


def debug_nans(c):
    """The project's detect_anomaly: stop at the first non-finite value and name where it came from (slow)."""
    c.train.debug_nans = True


def demo(c):
    """Synthetic paired S1/S2L2A tiles (64 px), a tiny random TerraMind (width 64, 2 + 2 blocks) and tokenizers
    (FSQ 5 x 5 x 5 = 125 ids, 16 px tokens), LoRA rank 8 on the cross-attention; no download."""
    c.data.demo, c.data.data_dir = "sar", "runs/stage3_demo_data"
    c.data.image_size = 64
    c.model.dtype = c.model.frozen_dtype = "float32"
    s = c.sar_grounding
    s.terramind, s.size = "random", "base"  # a random TerraMind (no download)
    s.overrides.update(dict(dim=64, num_heads=2, encoder_depth=2, decoder_depth=2, image_size=64))
    s.tokenizer_overrides.update(dict(levels=(5, 5, 5), image_size=64, enc_dim=64, enc_depth=2, enc_heads=2,
                                      dec_channels=32, dec_channel_mult=(1, 2), dec_res_blocks=1,
                                      dec_attention_resolutions=(2,), dec_groups=8, thresholding=False,
                                      clip_sample=False))
    s.tokenizer = "runs/stage3_demo_data/tokenizer_s2l2a.safetensors"  # fitted on the train tiles first
    s.fit_tokenizer_steps = 400
    s.timesteps = 2
    s.perceptual_weight = 0.0  # no DINO weights offline (a random ViT would measure nothing)
    c.train.steps, c.train.min_steps = 300, 0
    c.train.batch_size, c.train.grad_accum = 8, 1
    c.train.phases = ()
    c.optim.lr, c.optim.warmup_steps = 2e-3, 20
    c.eval.every_steps = 50
    c.eval.at_start = True
