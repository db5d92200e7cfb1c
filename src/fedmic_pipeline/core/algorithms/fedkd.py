"""FedKD (Wu et al., Nature Communications 2022): mentor-mentee mutual distillation + SVD.

Each client keeps a local *mentor* (the teacher, ResNet-18 by default; never shared) and
trains it together with the shared *mentee* (the student) by mutual distillation:
adaptive weights 1/(CE_mentor + CE_mentee), tau^2 KL in both directions, and a
hidden-state MSE through *one* learnable matrix W_h (methods.md section 3). The mentee's
update is SVD-compressed with the same energy schedule (0.95 -> 0.98) and the server
averages the decoded updates weighted by sample counts.

FedKD is therefore FedMIC's machinery (``fedmic.py``) with ``projection_mode = "shared"``
instead of FedMIC's bi-directional A/B matrices; every option (teacher width, error
feedback, fp16 factors, downlink compression) is available and defaults as in FedMIC.

Interpretations recorded here (beyond FedMIC's):

* ``fedkd.hidden_loss``: one bias-free matrix W_h maps the mentee's features into the
  mentor's space; L_h = MSE(h_mentor, W_h h_mentee) enters both losses: the mentor's term
  trains mentor and W_h, the mentee's term trains the mentee only.
* ``fedkd.attention_loss``: FedKD's attention-map distillation is for transformers and
  has no counterpart in these CNNs; it is omitted.
* ``fedkd.downlink``: the paper compresses the global update as well; here that is the
  ``downlink_compression`` option (off by default, as it requires ``join_ratio`` = 1).
* ``fedkd.personalized_model``: the mentor, the model that stays with the hospital.
"""

from __future__ import annotations

from dataclasses import dataclass
from .base import register
from .fedmic import FedMIC, FedMICConfig

__all__ = ["FedKD", "FedKDConfig"]


@dataclass(frozen=True)
class FedKDConfig(FedMICConfig):
    """FedKD shares FedMIC's hyper-parameters (defaults: tau 1, energy 0.95 -> 0.98)."""


@register("fedkd")
class FedKD(FedMIC):
    config_class = FedKDConfig
    projection_mode = "shared"
    interpretations = {
        **FedMIC.interpretations,
        "hidden_loss": "one W_h student->teacher; mentor term trains mentor+W_h, mentee term mentee only",
        "attention_loss": "omitted (transformer-only)",
        "personalized_model": "mentor (teacher)",
    }
