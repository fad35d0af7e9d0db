"""Training-time pruning methods built on the API and the torch bridge: Network Slimming and Gate
Decorator (METHODS.md).  They import torch; nothing imports them when graphprune is imported."""
