"""One entry per algorithm configuration, shared by the cross-cutting score tests.

Each entry builds a fresh score and names the TinyConvNet layers it records:
(1, 2) softplus feature maps, (1, 4) flattened pooled features, (1, 5) logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scio import scores
from scio.scores import BaseScore

Layer = tuple[int, int]


@dataclass(frozen=True)
class Entry:
    """A score configuration for the tests."""

    name: str
    factory: Callable[[], BaseScore]
    layers: tuple[Layer, ...] = ()
    uses_labels: bool = False
    grid: dict[str, list[Any]] = field(default_factory=dict)

    def make(self, **params: Any) -> BaseScore:
        score = self.factory()
        score.set_params(**params)
        return score


FEAT = (1, 4)
LOGITS = (1, 5)
MAPS = (1, 2)
JTLA_TEST = {"type": "multinomial", "mode": "mle", "k": 3}

CATALOGUE: tuple[Entry, ...] = (
    Entry("Softmax", scores.Softmax, grid={"mode": ["raw", "diff", "ratio"]}),
    Entry("BaselineClassif", scores.BaselineClassif),
    Entry("Logit", scores.Logit, grid={"mode": ["raw", "diff"]}),
    Entry("Energy", scores.Energy, grid={"temperature": [0.5, 1.0, 10.0]}),
    Entry("JointEnergy", scores.JointEnergy),
    Entry(
        "ODIN",
        lambda: scores.ODIN(temperature=2.0),
        grid={
            "temperature": [1.0, 1000.0],
            "epsilon": [0.0, 0.01],
            "fgm_norm": [2.0, float("inf")],
        },
    ),
    Entry(
        "ReAct",
        scores.ReAct,
        (MAPS, FEAT),
        grid={
            "percentile": [60.0, 90.0, 100.0],
            "symmetric": [False, True],
            "per_layer": [False, True],
        },
    ),
    Entry(
        "IsoMax",
        lambda: scores.IsoMax(n_steps=20),
        uses_labels=True,
        grid={"dist_norm": [1.0, 2.0], "n_steps": [0, 20]},
    ),
    Entry(
        "GradNorm",
        scores.GradNorm,
        (LOGITS,),
        grid={"temperature": [1.0, 3.0], "grad_norm": [1.0, 2.0, float("inf")]},
    ),
    Entry("GradNorm-conv", scores.GradNorm, (MAPS, LOGITS), grid={"grad_norm": [1.0, 2.0]}),
    Entry(
        "KNN",
        lambda: scores.KNN(k=3),
        (MAPS, FEAT),
        grid={"k": [1, 3], "index_metric": ["l2", "ip"], "act_norm": [None, 2.0]},
    ),
    Entry("LID", lambda: scores.LID(k=3), (FEAT,), grid={"k": [2, 5]}),
    Entry(
        "Trust",
        lambda: scores.Trust(alpha=0.1, k=3),
        (FEAT,),
        uses_labels=True,
        grid={"alpha": [0.0, 0.1, 0.5], "k": [1, 3]},
    ),
    Entry(
        "DeepMahalanobis",
        scores.DeepMahalanobis,
        (MAPS, FEAT),
        uses_labels=True,
        grid={
            "epsilon": [0.0, 0.01],
            "fgm_norm": [2.0, float("inf")],
            "act_norm": [None, 2.0],
            "normalize": [False, True],
        },
    ),
    Entry(
        "RelativeMahalanobis",
        scores.RelativeMahalanobis,
        (FEAT, LOGITS),
        uses_labels=True,
        grid={"epsilon": [0.0, 0.01], "weights": [None, [1.0, 0.5]], "normalize": [False, True]},
    ),
    Entry(
        "DkNN",
        lambda: scores.DkNN(k=3),
        (MAPS, FEAT),
        uses_labels=True,
        grid={
            "per_class": [False, True],
            "per_layer": [False, True],
            "aggregation": ["mean", "fisher", 2.0],
        },
    ),
    Entry(
        "FeatureSqueezing",
        lambda: scores.FeatureSqueezing(squeezers=("bits:3", "median:2")),
        grid={
            "dist_norm": [1.0, 2.0],
            "aggregation": ["max", "mean"],
            "squeezers": ["bits:5", ("median:3", "bits:2")],
        },
    ),
    Entry(
        "Gram",
        lambda: scores.Gram(max_gram_order=3),
        (MAPS, FEAT),
        uses_labels=True,
        grid={
            "separate_diagonal": [False, True],
            "calib_labels": ["pred", "true"],
            "cut_off": [0.1, 0.3],
        },
    ),
    Entry(
        "Odds",
        lambda: scores.Odds(epsilon=0.1, noise_samples=8),
        uses_labels=True,
        grid={"z_aggregation": ["sum", "detect", "rectify"], "noise_samples": [4]},
    ),
    Entry(
        "JTLA",
        lambda: scores.JTLA(test=dict(JTLA_TEST)),
        (MAPS, FEAT),
        uses_labels=True,
        grid={
            "layer_aggregation": ["fisher", "fisher:1,2", "lpe"],
            "class_aggregation": ["nat", "adv"],
            "pred_conditional": [True, False],
        },
    ),
    Entry("Entropy", scores.Entropy, grid={"mode": ["raw", "diff"]}),
    Entry("GEN", scores.GEN, grid={"gamma": [0.1, 0.5], "M": [None, 2]}),
    Entry("KLM", scores.KLM),
    Entry(
        "OpenMax",
        lambda: scores.OpenMax(tailsize=5),
        uses_labels=True,
        grid={
            "tailsize": [5, 25],
            "alpha": [1, 3],
            "distance": ["euclidean", "eucos"],
            "readout": ["class", "unknown"],
        },
    ),
    Entry(
        "ASH",
        scores.ASH,
        (FEAT,),
        grid={
            "percentile": [65.0, 90.0],
            "variant": ["p", "b", "s"],
            "readout": ["energy", "softmax"],
        },
    ),
    Entry(
        "SCALE",
        scores.SCALE,
        (FEAT,),
        grid={"percentile": [10.0, 65.0], "readout": ["energy", "msp"]},
    ),
    Entry(
        "DICE", scores.DICE, (FEAT,), grid={"p": [0.0, 50.0, 90.0], "readout": ["energy", "logit"]}
    ),
    Entry("ViM", scores.ViM, (FEAT,), grid={"dim": [None, 2, 7]}),
    Entry(
        "NNGuide",
        lambda: scores.NNGuide(k=3),
        (FEAT,),
        grid={"k": [1, 3], "bank_fraction": [1.0, 0.5]},
    ),
    Entry("fDBD", scores.fDBD, (FEAT,)),
    Entry(
        "NCI",
        scores.NCI,
        (FEAT,),
        grid={"alpha": [0.0, 0.01], "proximity": ["projection", "cosine"]},
    ),
    Entry(
        "SHE",
        scores.SHE,
        (FEAT,),
        uses_labels=True,
        grid={"metric": ["inner_product", "euclidean", "cosine"]},
    ),
    Entry(
        "VRA",
        scores.VRA,
        (FEAT,),
        grid={
            "percentile_high": [90.0, 100.0],
            "percentile_low": [0.0, 10.0],
            "readout": ["energy", "softmax"],
        },
    ),
    Entry(
        "CFOOD",
        lambda: scores.CFOOD(alpha=0.5),
        (FEAT,),
        grid={"alpha": [0.5, 1.0], "k": [0.01, 0.2], "seed": [0, 1]},
    ),
    Entry("Relation", scores.Relation, (FEAT,), grid={"pow": [1, 2.5]}),
    Entry("Residual", lambda: scores.Residual(dim=4), (FEAT,), grid={"dim": [2, 6]}),
    Entry(
        "ReweightOOD",
        scores.ReweightOOD,
        (FEAT,),
        uses_labels=True,
        grid={"normalize": [True, False], "epsilon": [0.0, 0.01]},
    ),
    Entry(
        "AdaScale",
        lambda: scores.AdaScale(o=0.25),  # 16 input elements: int(0.05 · 16) = 0 perturbed
        (FEAT,),
        grid={"variant": ["a", "l"], "percentile": [(75.0, 85.0), (10.0, 90.0)]},
    ),
    Entry(
        "IODIN",
        scores.IODIN,
        grid={"temperature": [1.0, 1000.0], "noise": [0.0, 0.0014]},
    ),
    Entry(
        "RankFeat",
        scores.RankFeat,
        (MAPS, (1, 3)),  # softplus maps and pooled maps (n, 2, 2, 2)
        grid={"temperature": [1.0, 2.0], "accelerate": [False, True]},
    ),
    Entry(
        "GMM",
        lambda: scores.GMM(
            num_clusters_list=(2, 3),
            feature_type_list=("stat", "flat"),
            alpha_list=(0.5, 1.0),
            reduce_dim_list=("none", "pca_4"),
        ),
        (MAPS, FEAT),
        grid={
            "alpha_list": [(0.5, 1.0), (0.0, 1.0)],
            "feature_type_list": [("stat", "flat"), ("mean", "mean")],
        },
    ),
    Entry(
        "GROOD",
        lambda: scores.GROOD(use_proto_mean=True),  # no OoD sample labelled -1 here
        (FEAT,),
        uses_labels=True,
        grid={"k": [1, 3], "no_gradients": [False, True]},
    ),
)

BY_NAME = {entry.name: entry for entry in CATALOGUE}
