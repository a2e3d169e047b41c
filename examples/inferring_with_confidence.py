"""Inferring with Confidence: the reference tutorial, with the model loaded offline.

The code below is the tutorial's, unchanged except for the line that loads the model:
the trained Tiniest CIFAR-10 network ships with scio instead of coming from a hub.
Bare expressions (``rnet``, ``score.fit(...)``) display their value when this file is run
with ``scio demo`` or in a notebook; ``python examples/inferring_with_confidence.py``
prints only the per-sample lines and the timer report.
"""

# %%
# Model and (fake) calibration data, as in the tutorial.
import torch

sample_shape = (3, 32, 32)
calib_data = torch.rand(10, *sample_shape)
calib_labels = torch.randint(0, 10, calib_data.shape)
from scio.models import tiniest

net = tiniest()
net = net.to(calib_data)

# %%
# 1. Choose an algorithm and the internal representation to use.
from scio.recorder import Recorder
from scio.scores import KNN

score = KNN(k=int(len(calib_data) ** 0.4))
rnet = Recorder(net, input_data=calib_data[[0]])
rnet  # Visualize layers

# %%
rnet.record((1, 11))  # Record the feature maps

# %%
# 2. Calibrate the score function.
score.fit(rnet, calib_data, calib_labels)

# %%
# 3. Infer with confidence.
test_data = torch.rand(5, *sample_shape)
out, conformity = score(test_data)

# %%
preds = out.argmax(1)
confs = conformity[:, 0]  # KNN is constant across classes
for i, (pred, conf) in enumerate(zip(preds, confs, strict=True)):
    print(f"Sample {i}: predicted {pred} with confidence {conf}")

# %%
# Profiling.
score.timer.report  # Report execution times
