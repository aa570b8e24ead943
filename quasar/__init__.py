"""The Quasar student model, as Hugging Face classes registered with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from quasar.configuration import PRESETS, QuasarConfig
from quasar.modeling import QuasarCache, QuasarForCausalLM, QuasarModel, QuasarPreTrainedModel

AutoConfig.register("quasar", QuasarConfig, exist_ok=True)
AutoModel.register(QuasarConfig, QuasarModel, exist_ok=True)
AutoModelForCausalLM.register(QuasarConfig, QuasarForCausalLM, exist_ok=True)

__all__ = [
    "PRESETS",
    "QuasarCache",
    "QuasarConfig",
    "QuasarForCausalLM",
    "QuasarModel",
    "QuasarPreTrainedModel",
]
