"""The objective axis: which loss the optimizer minimises (methods/base.py: ``Objective``)."""
