"""The two frameworks the report is organised after, and where it answers each item.

EU AI Act Annex IV gives the structure of the technical documentation; the FDA/Health
Canada/MHRA Good Machine Learning Practice principles (2021) are cross-referenced with how
far an automated report can address each. Both name the report sections that hold the
evidence, so the HTML page can link them.
"""

from __future__ import annotations

from typing import Any

GMLP_PRINCIPLES = (
    (1, "Multi-disciplinary expertise is leveraged throughout the total product life cycle", "out of scope",
     "Organisational; not evidenced by an automated report.", []),
    (2, "Good software engineering and security practices are implemented", "partly addressed",
     "Code version (git), data versioning (DVC), re-hash of every input, data gates, tests in the repository.",
     ["code_version", "data_versioning", "integrity", "data_gates"]),
    (3, "Clinical study participants and data sets are representative of the intended patient population", "partly addressed",
     "Per-site and per-device results, including the worst site; hospitals and devices are simulated, no demographics exist.",
     ["validation_and_test", "model_card"]),
    (4, "Training data sets are independent of test sets", "addressed",
     "The global test set is the untouched official test split; gate checks show no test image in training.",
     ["train_test_independence"]),
    (5, "Selected reference datasets are based upon best available methods", "partly addressed",
     "Labels are MedMNIST's, derived from the published source datasets; md5 verified against the official release.",
     ["data_provenance"]),
    (6, "Model design is tailored to the available data and reflects the intended use of the device", "addressed",
     "Algorithm, parameters and interpretation choices of the run; intended use in the model card.",
     ["training_process", "parameters", "model_card"]),
    (7, "Focus is placed on the performance of the human-AI team", "out of scope",
     "Research system without a human-in-the-loop study.", []),
    (8, "Testing demonstrates device performance during clinically relevant conditions", "partly addressed",
     "Global and per-device results with 95% intervals, a device never seen in training, calibration (ECE).",
     ["validation_and_test"]),
    (9, "Users are provided clear, essential information", "addressed",
     "Model card: intended use (research only, not for clinical use), limitations, caveats.", ["model_card"]),
    (10, "Deployed models are monitored for performance and re-training risks are managed", "partly addressed",
     "Not deployed. Registry promotion only on the same data version and with a margin; re-audit detects changed data.",
     ["model_registry", "integrity"]),
)  # fmt: skip

ANNEX_IV = (
    ("1", "General description of the AI system", ["general", "model_card", "environment"]),
    ("2(a)", "Methods and steps of development", ["training_process"]),
    ("2(b)", "Design specifications, key choices and parameters", ["parameters", "training_process"]),
    ("2(c)", "System architecture and computational resources", ["environment"]),
    ("2(d)", "Data requirements: provenance, selection, cleaning, versioning", ["data_provenance", "data_versioning", "data_gates", "train_test_independence", "synthetic_data"]),
    ("2(e)", "Human oversight measures", ["model_card"]),
    ("2(g)", "Validation and testing procedures, metrics and results", ["validation_and_test", "integrity"]),
    ("3", "Monitoring, functioning and control: capabilities, limitations, results per group", ["validation_and_test", "model_card"]),
    ("4", "Appropriateness of the performance metrics", ["validation_and_test"]),
    ("5", "Risk management system (Article 9)", []),
    ("6", "Changes through the life cycle", ["code_version", "data_versioning", "model_registry"]),
    ("7", "Standards and specifications applied", ["gmlp"]),
    ("8", "EU declaration of conformity", []),
    ("9", "Post-market monitoring plan", []),
)  # fmt: skip


def annex_iv_index() -> list[dict[str, Any]]:
    return [{"item": i, "title": t, "sections": s} for i, t, s in ANNEX_IV]


def gmlp_crosswalk() -> list[dict[str, Any]]:
    return [{"principle": n, "title": t, "status": s, "evidence": e, "sections": refs} for n, t, s, e, refs in GMLP_PRINCIPLES]
