"""Run the qat stage for 2 steps in this process (one rank of a torchrun launch, or alone).

    python dp_qat.py MODEL_DIR DATA_FILE OUT_DIR
"""

import os
import sys
from pathlib import Path

from posttrain.stages.base import StageContext
from posttrain.stages.qat import QATStageConfig, run_qat

model_dir, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
rank = int(os.environ.get("RANK", "0"))
ctx = StageContext(name="qat", kind="qat", stage_dir=out, run_dir=out, seed=0, recipe_name="t", is_main=rank == 0)
cfg = QATStageConfig(model=model_dir, dataset=data, scheme="int4_per_block", max_steps=2, batch_size=4,
                     learning_rate=1e-3, chunk_size=None)
run_qat(cfg, ctx)
