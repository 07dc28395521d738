"""Preference data for QRPO and DPO: the dataset's schema and layouts, sampling reference completions, rewards, and
the pipeline that turns prompts into a QRPO dataset (`recipes/qrpo_prepare.py`).

- `schema`: the two layouts of a QRPO dataset (`PreferenceLayout`), the row checks, and the quantile reward.
- `sampling`: completions from a causal LM with `generate`, reproducible on any number of processes.
- `scoring`: a reward model or a Python reward function, called in TRL's reward convention; `rewards`: toy rewards.
- `charter`: a charter file (the principles a judge rates by) and the judge's prompts; `judge`: `CharterJudge`, an
  LLM judge as a reward (1-9 from the digit probabilities, the top completions re-ranked in pairs); `labelling`: which
  prompts are contested (`recipes/label_prompts.py`), the judge's route in qrpo_prepare.
- `selection`: which samples become rows (every one, or Apertus' chosen/rejected pairs).
- `prepare`: the pipeline (sample, score with the reward or the judge, select, save atomically) and its recipe config.

The trainers read these datasets; nothing here imports them.
"""

from .charter import Charter, CharterError, Principle, load_charter
from .errors import QRPODatasetError, QRPOPrepareError
from .judge import CharterJudge, JudgeError, JudgeTally
from .labelling import LabelPromptsConfig, LabelPromptsError, LabelPromptsResult, contested_probabilities, label_prompts
from .prepare import STATS_FILE_NAME, QRPOPrepareConfig, QRPOPrepareResult, load_prompts, prepare_qrpo_dataset
from .rewards import answer_similarity, substring_frequency
from .sampling import Completion, Prompt, generate_completions, is_chat_prompt, sample_completions, sampling_config
from .schema import PAIRED_COLUMNS, UNPAIRED_COLUMNS, PreferenceLayout, qrpo_dataset_layout, quantile_rewards
from .scoring import RewardModelScorer, load_reward, score_completions
from .selection import build_qrpo_rows, select_pair

__all__ = [
    "PAIRED_COLUMNS",
    "STATS_FILE_NAME",
    "UNPAIRED_COLUMNS",
    "Charter",
    "CharterError",
    "CharterJudge",
    "Completion",
    "JudgeError",
    "JudgeTally",
    "LabelPromptsConfig",
    "LabelPromptsError",
    "LabelPromptsResult",
    "PreferenceLayout",
    "Principle",
    "Prompt",
    "QRPODatasetError",
    "QRPOPrepareConfig",
    "QRPOPrepareError",
    "QRPOPrepareResult",
    "RewardModelScorer",
    "answer_similarity",
    "build_qrpo_rows",
    "contested_probabilities",
    "generate_completions",
    "is_chat_prompt",
    "label_prompts",
    "load_charter",
    "load_prompts",
    "load_reward",
    "prepare_qrpo_dataset",
    "qrpo_dataset_layout",
    "quantile_rewards",
    "sample_completions",
    "sampling_config",
    "score_completions",
    "select_pair",
    "substring_frequency",
]
