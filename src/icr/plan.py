"""What iteration t of a run works on: its folders, seed and models — the one place that decides.

`icr run` (icr.loop) and the single-stage commands (`icr generate/score/pairs/train`, icr.cli)
both take an iteration's paths, seed and reward pair from `iteration_plan`, so the two can never
disagree about where a stage writes or which models form the reward.

Models: pi_{-1} = pi_SFT (`models.sft`), pi_0 = pi0 (`models.dpo`), pi_t = `<run>/iter<t>/model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import ExperimentConfig


def model_paths(cfg: ExperimentConfig, run_dir: Path) -> dict[int, str]:
    """pi_t for t = -1 (pi_SFT), 0 (pi0), 1..iterations (trained in `run_dir`)."""
    paths = {-1: cfg.models.sft, 0: cfg.models.dpo}
    for t in range(1, cfg.iterations + 1):
        paths[t] = str(Path(run_dir) / f"iter{t}" / "model")
    return paths


def reward_pair(cfg: ExperimentConfig, paths: dict[int, str], t: int) -> tuple[str, str]:
    """(pi_dpo, pi_ref) forming the implicit reward at iteration t (see reward.models)."""
    if cfg.reward.models == "initial":
        return paths[0], paths[-1]
    if cfg.reward.models == "current":
        return paths[t - 1], paths[-1]
    return paths[t - 1], paths[t - 2] if t >= 2 else paths[-1]


def model_label(t: int, control: str | None = None) -> str:
    """The results.json label of pi_t: sft, M0, M1, ...; a control's trained models get `-<control>`."""
    name = "sft" if t == -1 else f"M{t}"
    return name if control is None or t <= 0 else f"{name}-{control}"


@dataclass(frozen=True)
class IterationPlan:
    t: int
    dir: Path  # <run>/iter<t>
    seed: int  # sampling, pair selection and training seed of this iteration
    policy: str  # pi_{t-1}: sampled from, trained from, the training reference and the translator
    reward_policy: str  # pi_dpo of the implicit reward
    reward_reference: str  # pi_ref of the implicit reward
    model_dir: Path  # pi_t, written by the train stage

    def to_dict(self) -> dict:
        """JSON form (a job file's `args["plan"]`, icr.launch); `plan_from_dict` reads it back."""
        return {"t": self.t, "dir": str(self.dir), "seed": self.seed, "policy": self.policy,
                "reward_policy": self.reward_policy, "reward_reference": self.reward_reference,
                "model_dir": str(self.model_dir)}

    @property
    def generate_dir(self) -> Path:
        return self.dir / "generate"

    @property
    def score_dir(self) -> Path:
        return self.dir / "score"

    @property
    def pairs_dir(self) -> Path:
        return self.dir / "pairs"

    @property
    def train_dir(self) -> Path:
        return self.dir / "train"


def plan_from_dict(data: dict) -> IterationPlan:
    return IterationPlan(**{**data, "dir": Path(data["dir"]), "model_dir": Path(data["model_dir"])})


def iteration_plan(cfg: ExperimentConfig, run_dir: Path, t: int) -> IterationPlan:
    """Iteration t (1-based) of the run in `run_dir` (the main run or a control's folder)."""
    if not 1 <= t <= cfg.iterations:
        raise ValueError(f"iteration {t} outside 1..{cfg.iterations}")
    paths = model_paths(cfg, run_dir)
    dpo, ref = reward_pair(cfg, paths, t)
    it = Path(run_dir) / f"iter{t}"
    return IterationPlan(t=t, dir=it, seed=cfg.seed + t - 1, policy=paths[t - 1], reward_policy=dpo,
                         reward_reference=ref, model_dir=it / "model")
