"""Stage kinds. Importing this package registers every built-in kind in STAGE_KINDS."""

from posttrain.stages.base import STAGE_KINDS, StageConfig, StageContext, StageError, StageResult, register_stage

from posttrain.stages import filter as _filter  # noqa: E402,F401
from posttrain.stages import sft as _sft  # noqa: E402,F401
from posttrain.stages import export as _export  # noqa: E402,F401
from posttrain.stages import evaluate as _evaluate  # noqa: E402,F401
from posttrain.stages import distill as _distill  # noqa: E402,F401
from posttrain.stages import distill_cache as _distill_cache  # noqa: E402,F401
from posttrain.stages import rl as _rl  # noqa: E402,F401
from posttrain.stages import merge as _merge  # noqa: E402,F401
from posttrain.stages.rl import warp as _warp  # noqa: E402,F401
from posttrain.stages import reward_model as _reward_model  # noqa: E402,F401
from posttrain.stages import qat as _qat  # noqa: E402,F401

__all__ = ["STAGE_KINDS", "StageConfig", "StageContext", "StageError", "StageResult", "register_stage"]
