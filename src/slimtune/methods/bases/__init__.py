"""The base axis: how the frozen weights are stored (methods/base.py: ``BaseWeights``)."""
