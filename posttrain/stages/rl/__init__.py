"""`rl`: REINFORCE with a leave-one-out baseline and a KL penalty to an EMA anchor (WARP, stage 1;
`rloo.py`), or J-BOND / BOND (`algorithm: jbond | bond`; `bond.py`), in one loop (`loop.py`).

    config.py   RLStageConfig (on the shared TrainingOptions) and BOND's block, BondOptions
    step.py     what a step works with: Learner, StepState, the data order, the update, the metrics
    rloo.py     RLOO with the EMA anchor: RLOO.step and policy_gradient_pass
    bond.py     J-BOND / BOND: Bond.step, AnchorRollouts and bond_gradient_pass
    loop.py     run_rl: set up, resume, step, evaluate, checkpoint, save
"""

from posttrain.stages.base import register_stage
from posttrain.stages.rl.bond import (AnchorRollouts, Bond, BondBatch, BondStats, anchor_sampling_seed,
                                      bond_gradient_pass)
from posttrain.stages.rl.config import BondOptions, RLStageConfig
from posttrain.stages.rl.loop import ALGORITHMS, RLRun, run_rl, setup_run, train
from posttrain.stages.rl.rloo import RLOO, RLOOStats, policy_gradient_pass
from posttrain.stages.rl.step import Learner, RLAlgorithm, StepState, StepStats, prompt_indices_for_step, sampling_seed

register_stage("rl", RLStageConfig, outputs=("model",), distributed=True)(run_rl)

__all__ = [
    "ALGORITHMS", "AnchorRollouts", "Bond", "BondBatch", "BondOptions", "BondStats", "Learner", "RLAlgorithm", "RLOO",
    "RLOOStats", "RLRun", "RLStageConfig", "StepState", "StepStats", "anchor_sampling_seed", "bond_gradient_pass", "policy_gradient_pass",
    "prompt_indices_for_step", "run_rl", "sampling_seed", "setup_run", "train",
]
