"""loramix: MixLoRA fine-tuning for Hugging Face causal language models."""

from .config import MixLoraConfig
from .errors import LoramixError
from .convert.export import export_mixtral, export_moe
from .families import FAMILIES
from .nn.dispatch import DISPATCHES
from .model import MixLoraModel, MixLoraModelForCausalLM, get_mixlora_model
from .training.kbit import prepare_model_for_kbit_training

__version__ = "0.1.0"

__all__ = ["DISPATCHES", "FAMILIES", "LoramixError", "MixLoraConfig", "MixLoraModel", "MixLoraModelForCausalLM",
           "export_mixtral", "export_moe", "get_mixlora_model", "prepare_model_for_kbit_training", "__version__"]
