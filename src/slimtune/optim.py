"""slimtune's optimizers as plain ``torch.optim.Optimizer`` classes, usable in any training loop.

    from slimtune.optim import GaLoreAdamW, galore_param_groups
    opt = GaLoreAdamW(galore_param_groups(model, rank=8, update_gap=200, scale=0.25), lr=1e-5)

Hand one to ``transformers.Trainer(optimizers=(opt, None))`` (without ``layerwise``: the Trainer
calls ``step()`` after backward). In a loop of your own, ``layerwise=True`` updates each tensor
inside backward; set ``opt.accumulating = True`` for every micro-batch but the last of a step,
``opt.max_grad_norm`` for clipping, and still call ``opt.step()`` once per step.
"""

from .methods.optim.galore import GaLoreAdamW, galore_param_groups
from .methods.optim.gradnorm_lorp import GradNormLoRPAdamW, weight_norm_grads
from .methods.optim.natural_galore import NaturalGaLoreAdamW, woodbury_natural_gradient

__all__ = [
    "GaLoreAdamW",
    "GradNormLoRPAdamW",
    "NaturalGaLoreAdamW",
    "galore_param_groups",
    "weight_norm_grads",
    "woodbury_natural_gradient",
]
