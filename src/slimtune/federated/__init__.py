"""Federated fine-tuning on Flower: ``slimtune fed`` (strategies fedavg, fedkseed, ferret)."""
