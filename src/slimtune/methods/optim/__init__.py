"""The optimizer axis: how an update is computed from the loss."""
