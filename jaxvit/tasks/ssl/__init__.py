"""Continued DINO self-supervised pretraining: losses, iBOT masks, multi-crop views, heads and the `ssl` task."""
