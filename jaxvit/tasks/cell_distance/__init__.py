"""DINOCell-style cell instance segmentation (`config.task="cell_distance"`): a U-Net decoder over intermediate ViT
features regresses a per-cell normalised distance map; a marker watershed turns the map into cell instances.

  model.py        the decoder (`DistanceDecoder`) and backbone + decoder (`CellDistanceModel`)
  targets.py      distance-map targets from instance label images
  postprocess.py  map -> instance labels (peaks as markers, watershed inside the cell region)
  metrics.py      instance matching: AP at IoU 0.5 and 0.5:0.95, F1, mean matched IoU
  data.py         paired images/ + masks/ folders, their transforms and the synthetic demo set
  task.py         the Task (loss, per-batch evaluation, prediction files)
"""
