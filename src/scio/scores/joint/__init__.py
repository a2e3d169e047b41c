"""Many scores on one network for the cost of one forward: joint fit and joint inference."""

from scio.scores.joint.fit import fit_jointly, split_batches
from scio.scores.joint.inference import JointInference, infer_jointly

__all__ = ["JointInference", "fit_jointly", "infer_jointly", "split_batches"]
