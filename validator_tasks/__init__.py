"""Long-context evaluation: RULER- and BABILong-style task generators, scorers, KL evaluation and
paired comparison (the streaming runner and reports come next). Knows nothing of chains.

    from validator_tasks import generate, score, TASKS
    sample = generate("niah_single", 16_384, seed=7, tokenizer=tok)
    score(sample, model_output)   # 0.0 .. 1.0
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
