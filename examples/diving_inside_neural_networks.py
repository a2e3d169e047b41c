"""Diving inside Neural Networks: the reference tutorial on the Recorder, offline.

The statements below are the tutorial's, unchanged except for the line that loads the model
(the trained Tiniest CIFAR-10 network ships with scio). Run it in a notebook (or ``scio``'s
tests) to display the bare expressions: the layer table and the recorded activations.
"""

# %%
from scio.recorder import Recorder  # noqa: I001 (the tutorial's order)

# %%
# Wrap a network: the Recorder lists its layers with their ``(depth, idx)`` identifiers.
import torch

from scio.models import tiniest

inputs = torch.rand(5, 3, 32, 32)  # Random inputs with 5 samples
net = tiniest()
net = net.to(inputs)

# %%
rnet = Recorder(net, input_data=inputs[[0]])
rnet  # Visualize layers

# %%
# The penultimate line of the table says which layers are recorded: none yet.
print(repr(rnet).split("\n")[-2])  # Show penultimate summary line

# %%
# Record the first block's output and the pooled feature maps.
rnet.record((1, 3), (1, 11))
print(repr(rnet).split("\n")[-2])  # Show penultimate summary line

# %%
# Every forward pass now keeps those activations, keyed by ``(depth, idx)``.
out = rnet(inputs)  # Forward pass, records the activations
rnet.activations
