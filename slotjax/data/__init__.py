"""Data: the embedded procedural scenes, the real data sets (TensorFlow, imported only when used), the input
pipeline and the set-prediction target encoding."""
