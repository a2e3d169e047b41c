"""Implementing your own OoD Detection algorithm (the reference points to ``TemplateClassif``).

Copy :class:`~scio.scores.classification.TemplateClassif`: a classification score subclasses
``BaseScoreClassif``, declares its hyper-parameters as annotated class attributes,
``calibrate`` learns from in-distribution data and ``get_conformity`` returns the network
output with a conformity (higher = more in-distribution). Here: the cosine similarity of the
recorded features to the mean feature of the predicted class, learnt on the calibration data.
"""

# %%
import torch
from torch import Tensor

from scio.models import tiniest
from scio.recorder import Recorder
from scio.scores import BaseScoreClassif


class ClassMeanCosine(BaseScoreClassif):
    """Cosine similarity of the features to the calibration mean of the predicted class."""

    eps: float = 1e-12

    def calibrate(self, calib_data: Tensor, calib_labels: Tensor) -> None:
        with torch.no_grad():
            out = self.rnet(calib_data)
        (features,) = self.activations(concatenate=True)
        pred = out.argmax(1)
        means = torch.zeros(out.shape[1], features.shape[1], dtype=features.dtype)
        means.index_add_(0, pred, features)
        self.means = torch.nn.functional.normalize(means, dim=1, eps=self.eps)

    def get_conformity(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.rnet(inputs)
        (features,) = self.activations(concatenate=True)
        features = torch.nn.functional.normalize(features, dim=1, eps=self.eps)
        return out, features @ self.means.T  # one conformity per class


# %%
torch.manual_seed(0)
calib_data = torch.rand(20, 3, 32, 32)
net = tiniest()
rnet = Recorder(net, input_data=calib_data[[0]])
rnet.record((1, 11))  # the pooled feature maps
score = ClassMeanCosine().fit(rnet, calib_data, None)
score

# %%
out, conformity = score(torch.rand(4, 3, 32, 32))
print(conformity.shape)  # (4, 10): one value per class
print(score.confidence(torch.rand(4, 3, 32, 32)).shape)  # the predicted class's only
