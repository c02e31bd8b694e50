"""Plain LoRA fine-tuning (peft): the quickstart method."""
