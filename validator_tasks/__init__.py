"""Long-context evaluation: RULER- and BABILong-style task generators, scorers, the streaming
evaluation runner with reports, KL evaluation and paired comparison. Knows nothing of chains.

    from validator_tasks import generate, score, TASKS
    sample = generate("niah_single", 16_384, seed=7, tokenizer=tok)
    score(sample, model_output)   # 0.0 .. 1.0

    from validator_tasks.config import EvalConfig
    from validator_tasks.runner import evaluate_models      # models on disk, each in its own process
    from validator_tasks.runner import evaluate             # any Predictor, e.g. a model in memory
    from validator_tasks.models import StreamingPredictor

Command line: `python -m validator_tasks eval --model DIR --lengths 4k,16k` and `... show REPORT.json`.
"""

from validator_tasks import babilong, ruler  # noqa: F401  (importing registers the tasks)
from validator_tasks.base import TASKS, Sample, TaskSpec, generate, register, task_rng
from validator_tasks.scoring import score, string_match_all, string_match_part

__all__ = [
    "TASKS",
    "Sample",
    "TaskSpec",
    "generate",
    "register",
    "score",
    "string_match_all",
    "string_match_part",
    "task_rng",
]
