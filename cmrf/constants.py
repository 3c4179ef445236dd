"""Constants shared by the models' timm configuration and the data pipeline (a leaf module)."""

# Images are scaled to [0, 1] then mapped to roughly zero mean, unit spread with these constants,
# the same for every channel and every dataset, so a model trained on one source accepts another.
NORMALIZE_MEAN = 0.5
NORMALIZE_STD = 0.25
