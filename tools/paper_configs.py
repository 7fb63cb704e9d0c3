"""Write configs/paper/*.yaml: one recipe per row of Tables 1-3 of the GLS paper (arXiv 2403.07095).

python tools/paper_configs.py          # (re)writes configs/paper/ and prints the row list

Schedules (paper App. B.1 / B.2):
- GRAD (certified training by backprop): Adam 5e-5; MNIST 70 epochs, eps annealed over the first
  20, lr x0.2 after 50 and 60; CIFAR-10 160 epochs, anneal 80, lr x0.2 after 120 and 140; batch
  256 (MNIST) / 128 (CIFAR-10); gradient clipping 10 (the defaults of Shi et al. 2021).
- PGPE: warm start from the row's PGD recipe (model.init_from), popsize 256, sigma 1e-3 fixed,
  Adam 3e-4, 150 epochs, lr x0.4 after 110 and 130, batch 512 (MNIST) / 128 (CIFAR-10); eps
  annealed over the first 50 epochs only for MNIST 0.3 and CIFAR-10 8/255.
- PGD (the warm start, a Table 1 row of its own): Adam 1e-3, 30 epochs (MNIST) / 100 (CIFAR-10),
  lr x0.2 after 20, 25 (MNIST) / 80, 90 (CIFAR-10).
- Table 2: PGPE + DeepPoly popsize 64..1024 on MNIST 0.1 (popsize 64 with a lower lr, 1e-4: the
  paper says "a lower learning rate", value not given).
- Table 3: CNN5 on MNIST 0.1: IBP, SABR (lambda 0.1), STAPS (lambda 0.2), DeepPoly under GRAD,
  DeepPoly under PGPE.
Values the paper does not state (PGD schedule, SABR/STAPS lambdas for CNN3, batch sizes of GRAD)
are marked "not stated in the paper" in each file.
"""

from __future__ import annotations

from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "configs" / "paper"

SETTINGS = {  # (dataset, eps label) -> eps, large-eps flag
    ("mnist", "0.1"): (0.1, False),
    ("mnist", "0.3"): (0.3, True),
    ("cifar10", "2_255"): (2 / 255, False),
    ("cifar10", "8_255"): (8 / 255, True),
}
TABLE1 = {
    ("mnist", "0.1"): ["ibp", "sabr", "staps", "hbox", "crown-ibp", "deeppoly"],
    ("mnist", "0.3"): ["ibp", "hbox", "crown-ibp", "deeppoly"],
    ("cifar10", "2_255"): ["ibp", "crown-ibp", "deeppoly"],
    ("cifar10", "8_255"): ["ibp", "crown-ibp", "deeppoly"],
}
LAMBDAS = {"sabr": 0.1, "staps": 0.2}


def row_name(ds, eps_label, arch, method, opt, extra=""):
    return f"{ds}-{eps_label}-{arch}-{method}-{opt}{extra}"


def data_section(ds):
    return {"name": ds, "root": "data"}


def pgd(ds, eps_label, arch):
    eps, _ = SETTINGS[(ds, eps_label)]
    mnist = ds == "mnist"
    return {
        "_comment": "PGD adversarial training: a Table 1 row and the warm start of the PGPE rows "
        "(schedule not stated in the paper)",
        "data": data_section(ds),
        "model": {"name": arch},
        "bound": {"method": "pgd", "eps": eps, "eps_schedule": "constant"},
        "optimizer": {
            "name": "grad",
            "lr": 1e-3,
            "lr_milestones": [20, 25] if mnist else [80, 90],
            "lr_factor": 0.2,
            "block_size": 64,
        },
        "train": {"epochs": 30 if mnist else 100, "batch_size": 256 if mnist else 128, "checkpoint_every": 500},
        "eval": {"methods": ["ibp", "crown-ibp", "deeppoly"]},
    }


def grad(ds, eps_label, arch, method):
    eps, _ = SETTINGS[(ds, eps_label)]
    mnist = ds == "mnist"
    bound = {
        "method": method,
        "eps": eps,
        "eps_schedule": "smooth",
        "warmup_epochs": 0,
        "anneal_epochs": 20 if mnist else 80,
    }
    if method in LAMBDAS:
        bound["options"] = {"sabr_lambda": LAMBDAS[method]}
    return {
        "_comment": "paper App. B.1 (GRAD)"
        + (f"; lambda {LAMBDAS[method]} (paper Table 3)" if method in LAMBDAS else ""),
        "data": data_section(ds),
        "model": {"name": arch},
        "bound": bound,
        "optimizer": {
            "name": "grad",
            "lr": 5e-5,
            "lr_milestones": [50, 60] if mnist else [120, 140],
            "lr_factor": 0.2,
            "grad_clip": 10.0,
            "block_size": 64,
        },
        "train": {"epochs": 70 if mnist else 160, "batch_size": 256 if mnist else 128, "checkpoint_every": 500},
        "eval": {"methods": ["ibp", "crown-ibp", "deeppoly"]},
    }


def pgpe(ds, eps_label, arch, method, popsize=256, lr=3e-4):
    eps, large = SETTINGS[(ds, eps_label)]
    mnist = ds == "mnist"
    bound = {"method": method, "eps": eps}
    bound |= (
        {"eps_schedule": "smooth", "warmup_epochs": 0, "anneal_epochs": 50} if large else {"eps_schedule": "constant"}
    )
    if method in LAMBDAS:
        bound["options"] = {"sabr_lambda": LAMBDAS[method]}
    return {
        "_comment": f"paper App. B.2 (PGPE), warm start from {row_name(ds, eps_label, arch, 'pgd', 'grad')}",
        "data": data_section(ds),
        "model": {"name": arch, "init_from": f"runs/paper/{row_name(ds, eps_label, arch, 'pgd', 'grad')}/latest.h5"},
        "bound": bound,
        "optimizer": {
            "name": "pgpe",
            "popsize": popsize,
            "lr": lr,
            "step_rule": "adam",
            "sigma_init": 1e-3,
            "fixed_sigma": True,
            "fitness_shaping": "centered_ranks",
            "lr_milestones": [110, 130],
            "lr_factor": 0.4,
            "block_size": 16,
        },
        "train": {"epochs": 150, "batch_size": 512 if mnist else 128, "checkpoint_every": 100},
        "eval": {"methods": ["ibp", "crown-ibp", "deeppoly"]},
    }


def rows() -> dict[str, dict]:
    out = {}
    for (ds, eps_label), methods in TABLE1.items():
        out[row_name(ds, eps_label, "cnn3", "pgd", "grad")] = pgd(ds, eps_label, "cnn3")
        for m in methods:
            out[row_name(ds, eps_label, "cnn3", m, "grad")] = grad(ds, eps_label, "cnn3", m)
            out[row_name(ds, eps_label, "cnn3", m, "pgpe")] = pgpe(ds, eps_label, "cnn3", m)
    for p in (64, 128, 256, 512, 1024):  # Table 2
        out[row_name("mnist", "0.1", "cnn3", "deeppoly", "pgpe", f"-pop{p}")] = pgpe(
            "mnist", "0.1", "cnn3", "deeppoly", popsize=p, lr=1e-4 if p == 64 else 3e-4
        )
    out[row_name("mnist", "0.1", "cnn5", "pgd", "grad")] = pgd("mnist", "0.1", "cnn5")  # Table 3
    for m in ("ibp", "sabr", "staps", "deeppoly"):
        out[row_name("mnist", "0.1", "cnn5", m, "grad")] = grad("mnist", "0.1", "cnn5", m)
    out[row_name("mnist", "0.1", "cnn5", "deeppoly", "pgpe")] = pgpe("mnist", "0.1", "cnn5", "deeppoly")
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, cfg in rows().items():
        comment = cfg.pop("_comment")
        text = f"# {name}: {comment}.\n# Run the whole chain with: bash jobs/paper.sh {name}\n"
        (OUT / f"{name}.yaml").write_text(text + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None))
        print(name)


if __name__ == "__main__":
    main()
