"""gptds: GPT-2-class pretraining and instruction fine-tuning on DeepSpeed ZeRO 1-3.
The model (gptds.model) is plain PyTorch; DeepSpeed is touched only in gptds.engine."""

__version__ = "0.1.0"
