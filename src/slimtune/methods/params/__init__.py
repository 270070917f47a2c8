"""The params axis: which parameters train, and in what form."""
