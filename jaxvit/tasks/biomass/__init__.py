"""Pasture biomass (the CSIRO Image2Biomass project, `config.task="biomass"`): five dry masses from a photo.

  maths.py  the long-CSV pivot, the official weighted R^2, the losses, the cross-validation groups
  data.py   the long-CSV source and the photo transform (with the strong augmentation of `jaxvit.data.photo_aug`)
  model.py  backbone + head with the metadata priors and the Depth Anything features
  task.py   the Task (loss, evaluation, the submission CSV)
"""
