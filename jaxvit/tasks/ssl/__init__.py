"""Self-supervised (DINO / iBOT / KoLeo / Gram) losses and iBOT block masks, after the official DINOv2/DINOv3 code."""
